/*
 * xfread: reads the files named on stdin (NUL-separated, as from find -print0)
 * until -limit-mib MiB were read, checksums them and prints the total. With
 * -copy-to FILE it also writes everything it read to FILE. Progress lines
 * "XF progress read_mib=N" go to -progress-fd every -progress-mib MiB.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "sum.h"

#define CHUNK (1 << 20)

static void usage(void)
{
	fprintf(stderr, "usage: xfread [-limit-mib N] [-progress-mib N -progress-fd FD] [-copy-to FILE] < list0\n");
	exit(2);
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int main(int argc, char **argv)
{
	unsigned long long limit = 0, every = 0, total = 0, next = 0;
	unsigned long files = 0, skipped = 0;
	int pfd = -1, out = -1;
	struct xf_sum sum;
	unsigned char *buf;
	char *path = NULL;
	size_t cap = 0;
	ssize_t len;

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "-limit-mib"))
			limit = strtoull(argv[++i], NULL, 10) << 20;
		else if (!strcmp(argv[i], "-progress-mib"))
			every = strtoull(argv[++i], NULL, 10) << 20;
		else if (!strcmp(argv[i], "-progress-fd"))
			pfd = atoi(argv[++i]);
		else if (!strcmp(argv[i], "-copy-to")) {
			const char *o = argv[++i];
			out = open(o, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			if (out < 0) {
				fprintf(stderr, "xfread: open %s: %s\n", o, strerror(errno));
				return 1;
			}
		} else
			usage();
	}
	buf = malloc(CHUNK);
	if (!buf) {
		fprintf(stderr, "xfread: out of memory\n");
		return 1;
	}
	xf_sum_init(&sum);
	next = every;
	while ((len = getdelim(&path, &cap, '\0', stdin)) > 0) {
		int fd = open(path, O_RDONLY | O_NOFOLLOW);
		ssize_t n;

		if (fd < 0) {
			skipped++;
			continue;
		}
		files++;
		while ((n = read(fd, buf, CHUNK)) > 0) {
			xf_sum_update(&sum, buf, (size_t)n);
			if (out >= 0 && write_all(out, buf, (size_t)n) < 0) {
				fprintf(stderr, "xfread: write: %s\n", strerror(errno));
				return 1;
			}
			total += (unsigned long long)n;
			if (every && pfd >= 0 && total >= next) {
				dprintf(pfd, "XF progress read_mib=%llu files=%lu\n", total >> 20, files);
				next += every;
			}
			if (limit && total >= limit)
				break;
		}
		close(fd);
		if (limit && total >= limit)
			break;
	}
	if (out >= 0 && close(out) < 0) {
		fprintf(stderr, "xfread: close: %s\n", strerror(errno));
		return 1;
	}
	printf("read %llu bytes from %lu files (%lu skipped), sum %016llx\n", total, files, skipped,
	       (unsigned long long)xf_sum_final(&sum));
	free(buf);
	free(path);
	return 0;
}
