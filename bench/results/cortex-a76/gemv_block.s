	ldr	q5, [x14], #16
	sshll	v6.8h, v5.8b, #4
	sshll2	v5.8h, v5.16b, #4
	bic	v5.8h, #120, lsl #8
	bic	v6.8h, #120, lsl #8
	zip1	v7.8h, v0.8h, v6.8h
	zip2	v6.8h, v0.8h, v6.8h
	zip1	v16.8h, v0.8h, v5.8h
	zip2	v5.8h, v0.8h, v5.8h
	ldr	s17, [x19, x10, lsl #2]
	fmul	v5.4s, v5.4s, v17.s[0]
	fmul	v16.4s, v16.4s, v17.s[0]
	subs	x15, x15, #1
	fmul	v6.4s, v6.4s, v17.s[0]
	cinc	x10, x10, eq
	fmul	v7.4s, v7.4s, v17.s[0]
	csel	x15, x11, x15, eq
	add	x16, x13, x9, lsl #6
	ldp	q18, q17, [x16, #32]
	ldp	q20, q19, [x16]
	fmla	v4.4s, v17.4s, v5.4s
	fmla	v3.4s, v18.4s, v16.4s
	fmla	v2.4s, v19.4s, v6.4s
	fmla	v1.4s, v20.4s, v7.4s
	add	x9, x9, #1
	cmp	x12, x9
	b.eq	.LBB4_36
	tst	x9, #0x3
	b.ne	.LBB4_12
