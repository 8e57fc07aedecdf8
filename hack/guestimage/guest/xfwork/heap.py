"""Application-heap workload for the guest image: builds an in-memory word
index of text and Python files under /usr until the process holds about
N MiB (argv[1]), prints "ready rss_mib=..." and then sleeps, keeping the heap
alive while the host dumps RAM."""
import os
import sys
import time


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def main():
    want = int(sys.argv[1])
    index = {}
    lines = []
    done = False
    for root in ("/usr/lib/python3.11", "/usr/share", "/usr/include", "/usr/lib"):
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "r", encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                for n, line in enumerate(text.splitlines()):
                    lines.append((path, n, line))
                    for word in line.split():
                        index.setdefault(word, []).append(len(lines) - 1)
                if rss_mib() >= want:
                    done = True
                    break
            if done:
                break
        if done:
            break
    print("ready rss_mib=%d words=%d lines=%d" % (rss_mib(), len(index), len(lines)), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
