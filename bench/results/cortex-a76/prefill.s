	lsl	x7, x6, #4
	ldr	q10, [x4, x7]
	ldr	q11, [x3, x7]
	ldr	q12, [x24, x7]
	add	x30, x10, x6, lsl #2
	ldr	q9, [x0, x7]
	ld1r	{ v13.4s }, [x30], x23
	fmla	v31.4s, v10.4s, v13.4s
	fmla	v30.4s, v11.4s, v13.4s
	fmla	v29.4s, v12.4s, v13.4s
	ld1r	{ v14.4s }, [x30], x23
	fmla	v28.4s, v9.4s, v13.4s
	fmla	v27.4s, v10.4s, v14.4s
	fmla	v26.4s, v11.4s, v14.4s
	ld1r	{ v13.4s }, [x30], x23
	fmla	v25.4s, v12.4s, v14.4s
	fmla	v24.4s, v9.4s, v14.4s
	fmla	v23.4s, v10.4s, v13.4s
	fmla	v22.4s, v11.4s, v13.4s
	fmla	v21.4s, v12.4s, v13.4s
	fmla	v20.4s, v9.4s, v13.4s
	ld1r	{ v13.4s }, [x30], x23
	fmla	v19.4s, v10.4s, v13.4s
	fmla	v18.4s, v11.4s, v13.4s
	fmla	v17.4s, v12.4s, v13.4s
	ld1r	{ v14.4s }, [x30], x23
	fmla	v16.4s, v9.4s, v13.4s
	fmla	v7.4s, v10.4s, v14.4s
	fmla	v6.4s, v11.4s, v14.4s
	fmla	v5.4s, v12.4s, v14.4s
	fmla	v4.4s, v9.4s, v14.4s
	ldr	s13, [x30]
	fmla	v3.4s, v10.4s, v13.s[0]
	fmla	v2.4s, v11.4s, v13.s[0]
	fmla	v1.4s, v12.4s, v13.s[0]
	add	x6, x6, #1
	cmp	x15, x6
	fmla	v0.4s, v9.4s, v13.s[0]
	b.ne	.LBB6_73
