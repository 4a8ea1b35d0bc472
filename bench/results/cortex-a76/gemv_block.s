	ldr	q7, [x30, x18]
	sshll2	v16.8h, v7.16b, #4
	sshll	v7.8h, v7.8b, #4
	bic	v7.8h, #120, lsl #8
	bic	v16.8h, #120, lsl #8
	zip2	v17.8h, v0.8h, v16.8h
	zip1	v16.8h, v0.8h, v16.8h
	zip2	v18.8h, v0.8h, v7.8h
	zip1	v7.8h, v0.8h, v7.8h
	fmul	v7.4s, v7.4s, v1.4s
	fmul	v18.4s, v18.4s, v1.4s
	fmul	v16.4s, v16.4s, v1.4s
	fmul	v17.4s, v17.4s, v1.4s
	fmul	v17.4s, v17.4s, v6.s[0]
	fmul	v16.4s, v16.4s, v6.s[0]
	fmul	v18.4s, v18.4s, v6.s[0]
	fmul	v7.4s, v7.4s, v6.s[0]
	add	x24, x9, x23, lsl #6
	ldp	q20, q19, [x24, #32]
	ldp	q22, q21, [x24]
	fmla	v5.4s, v19.4s, v17.4s
	fmla	v4.4s, v20.4s, v16.4s
	fmla	v2.4s, v21.4s, v18.4s
	fmla	v3.4s, v22.4s, v7.4s
	add	x23, x23, #1
	add	x18, x18, #16
	cmp	x11, x23
	b.eq	.LBB4_17
	add	w24, w29, w18
	tst	x24, #0x30
	b.ne	.LBB4_14
