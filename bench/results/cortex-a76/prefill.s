	lsl	x12, x8, #4
	ldr	q9, [x6, x12]
	ldr	q10, [x5, x12]
	ldr	q11, [x2, x12]
	add	x13, x23, x8, lsl #2
	ldr	q8, [x18, x12]
	ld1r	{ v12.4s }, [x13], x14
	fmla	v31.4s, v9.4s, v12.4s
	fmla	v30.4s, v10.4s, v12.4s
	fmla	v29.4s, v11.4s, v12.4s
	ld1r	{ v13.4s }, [x13], x14
	fmla	v28.4s, v8.4s, v12.4s
	fmla	v27.4s, v9.4s, v13.4s
	fmla	v26.4s, v10.4s, v13.4s
	ld1r	{ v12.4s }, [x13], x14
	fmla	v25.4s, v11.4s, v13.4s
	fmla	v24.4s, v8.4s, v13.4s
	fmla	v23.4s, v9.4s, v12.4s
	fmla	v22.4s, v10.4s, v12.4s
	fmla	v21.4s, v11.4s, v12.4s
	fmla	v20.4s, v8.4s, v12.4s
	ld1r	{ v12.4s }, [x13], x14
	fmla	v19.4s, v9.4s, v12.4s
	fmla	v18.4s, v10.4s, v12.4s
	fmla	v17.4s, v11.4s, v12.4s
	ld1r	{ v13.4s }, [x13], x14
	fmla	v16.4s, v8.4s, v12.4s
	fmla	v7.4s, v9.4s, v13.4s
	fmla	v6.4s, v10.4s, v13.4s
	fmla	v5.4s, v11.4s, v13.4s
	fmla	v4.4s, v8.4s, v13.4s
	ldr	s12, [x13]
	fmla	v3.4s, v9.4s, v12.s[0]
	fmla	v2.4s, v10.4s, v12.s[0]
	fmla	v1.4s, v11.4s, v12.s[0]
	add	x8, x8, #1
	cmp	x3, x8
	fmla	v0.4s, v8.4s, v12.s[0]
	b.ne	.LBB8_74
