	ldr	q7, [x25, x23]
	sshll2	v16.8h, v7.16b, #4
	sshll	v7.8h, v7.8b, #4
	bic	v7.8h, #120, lsl #8
	bic	v16.8h, #120, lsl #8
	zip2	v17.8h, v0.8h, v16.8h
	zip1	v16.8h, v0.8h, v16.8h
	zip2	v18.8h, v0.8h, v7.8h
	zip1	v7.8h, v0.8h, v7.8h
	add	x12, x7, x24, lsl #6
	ldp	q20, q19, [x12, #32]
	ldp	q22, q21, [x12]
	fmla	v6.4s, v19.4s, v17.4s
	fmla	v5.4s, v20.4s, v16.4s
	fmla	v4.4s, v21.4s, v18.4s
	fmla	v3.4s, v22.4s, v7.4s
	add	x24, x24, #1
	add	x23, x23, #16
	cmp	x20, x24
	b.eq	.LBB4_37
	add	w12, w29, w23
	tst	x12, #0x3f
	b.ne	.LBB4_33
