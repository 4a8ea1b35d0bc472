	ldr	q0, [x30, x14, lsl #4]
	sshll2	v1.8h, v0.16b, #4
	sshll	v0.8h, v0.8b, #4
	bic	v0.8h, #120, lsl #8
	bic	v1.8h, #120, lsl #8
	lsl	x9, x14, #6
	zip2	v2.8h, v9.8h, v1.8h
	zip1	v1.8h, v9.8h, v1.8h
	add	x2, x13, x9
	ldp	q4, q3, [x2, #32]
	zip2	v29.8h, v9.8h, v0.8h
	zip1	v0.8h, v9.8h, v0.8h
	ldp	q31, q30, [x2]
	add	x2, x10, x9
	fmla	v28.4s, v3.4s, v2.4s
	fmla	v27.4s, v4.4s, v1.4s
	ldp	q4, q3, [x2, #32]
	fmla	v26.4s, v30.4s, v29.4s
	fmla	v24.4s, v3.4s, v2.4s
	ldp	q30, q3, [x2]
	add	x2, x20, x9
	fmla	v23.4s, v4.4s, v1.4s
	fmla	v22.4s, v3.4s, v29.4s
	ldp	q4, q3, [x2, #32]
	add	x9, x17, x9
	fmla	v20.4s, v3.4s, v2.4s
	fmla	v19.4s, v4.4s, v1.4s
	ldp	q4, q3, [x9, #32]
	fmla	v14.4s, v3.4s, v2.4s
	ldp	q3, q2, [x2]
	fmla	v16.4s, v2.4s, v29.4s
	fmla	v6.4s, v4.4s, v1.4s
	ldp	q2, q1, [x9]
	fmla	v5.4s, v1.4s, v29.4s
	fmla	v25.4s, v31.4s, v0.4s
	fmla	v21.4s, v30.4s, v0.4s
	fmla	v7.4s, v3.4s, v0.4s
	fmla	v15.4s, v2.4s, v0.4s
	add	x14, x14, #1
	add	x5, x5, #16
	cmp	x15, x14
	b.eq	.LBB4_92
	tst	x5, #0x3f
	b.ne	.LBB4_88
