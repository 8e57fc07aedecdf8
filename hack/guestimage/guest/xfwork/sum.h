/* Streaming 64-bit checksum (FNV-1a over 8-byte words, then mixed). */
#ifndef XF_SUM_H
#define XF_SUM_H
#include <stddef.h>
#include <stdint.h>

struct xf_sum {
	uint64_t h;
	uint64_t n;
};

void xf_sum_init(struct xf_sum *s);
void xf_sum_update(struct xf_sum *s, const unsigned char *p, size_t len);
uint64_t xf_sum_final(const struct xf_sum *s);
#endif
