	ldr	q0, [x23, x17, lsl #4]
	sshll2	v1.8h, v0.16b, #4
	sshll	v0.8h, v0.8b, #4
	bic	v0.8h, #120, lsl #8
	bic	v1.8h, #120, lsl #8
	lsl	x8, x17, #6
	zip2	v2.8h, v10.8h, v1.8h
	zip1	v1.8h, v10.8h, v1.8h
	add	x9, x16, x8
	ldp	q4, q3, [x9, #32]
	zip2	v5.8h, v10.8h, v0.8h
	zip1	v0.8h, v10.8h, v0.8h
	ldp	q31, q30, [x9]
	add	x9, x10, x8
	fmla	v29.4s, v3.4s, v2.4s
	fmla	v28.4s, v4.4s, v1.4s
	ldp	q4, q3, [x9, #32]
	fmla	v27.4s, v30.4s, v5.4s
	fmla	v25.4s, v3.4s, v2.4s
	ldp	q30, q3, [x9]
	add	x9, x12, x8
	fmla	v24.4s, v4.4s, v1.4s
	fmla	v23.4s, v3.4s, v5.4s
	ldp	q4, q3, [x9, #32]
	add	x8, x0, x8
	fmla	v21.4s, v3.4s, v2.4s
	fmla	v20.4s, v4.4s, v1.4s
	ldp	q4, q3, [x8, #32]
	fmla	v17.4s, v3.4s, v2.4s
	ldp	q3, q2, [x9]
	fmla	v19.4s, v2.4s, v5.4s
	fmla	v16.4s, v4.4s, v1.4s
	ldp	q2, q1, [x8]
	fmla	v7.4s, v1.4s, v5.4s
	fmla	v26.4s, v31.4s, v0.4s
	fmla	v22.4s, v30.4s, v0.4s
	fmla	v18.4s, v3.4s, v0.4s
	fmla	v6.4s, v2.4s, v0.4s
	add	x17, x17, #1
	add	x29, x29, #16
	cmp	x1, x17
	b.eq	.LBB4_125
	tst	x29, #0x3f
	b.ne	.LBB4_121
