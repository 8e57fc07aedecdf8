#include <string.h>
#include "sum.h"

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

void xf_sum_init(struct xf_sum *s)
{
	s->h = FNV_OFFSET;
	s->n = 0;
}

void xf_sum_update(struct xf_sum *s, const unsigned char *p, size_t len)
{
	uint64_t h = s->h, w;
	size_t i = 0;

	for (; i + 8 <= len; i += 8) {
		memcpy(&w, p + i, 8);
		h ^= w;
		h *= FNV_PRIME;
	}
	for (; i < len; i++) {
		h ^= p[i];
		h *= FNV_PRIME;
	}
	s->h = h;
	s->n += len;
}

uint64_t xf_sum_final(const struct xf_sum *s)
{
	uint64_t h = s->h ^ s->n;

	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	return h;
}
