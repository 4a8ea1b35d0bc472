	ldr	q6, [x20, x10]
	sshll2	v7.8h, v6.16b, #4
	sshll	v6.8h, v6.8b, #4
	bic	v6.8h, #120, lsl #8
	bic	v7.8h, #120, lsl #8
	zip2	v16.8h, v0.8h, v7.8h
	zip1	v7.8h, v0.8h, v7.8h
	zip2	v17.8h, v0.8h, v6.8h
	zip1	v6.8h, v0.8h, v6.8h
	add	x7, x9, x6, lsl #6
	ldp	q19, q18, [x7, #32]
	ldp	q21, q20, [x7]
	fmla	v5.4s, v18.4s, v16.4s
	fmla	v4.4s, v19.4s, v7.4s
	fmla	v3.4s, v20.4s, v17.4s
	fmla	v2.4s, v21.4s, v6.4s
	add	x6, x6, #1
	add	x10, x10, #16
	cmp	x18, x6
	b.eq	.LBB4_26
	add	w7, w5, w10
	tst	x7, #0x3f
	b.ne	.LBB4_22
