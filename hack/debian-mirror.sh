# debian_mirror: print the Debian archive this machine's apt is configured
# with (DEBIAN_MIRROR overrides it). Sourced by the scripts that bootstrap
# Debian root filesystems; fails with a clear message when there is none,
# because a guessed mirror would only hang on a machine that cannot reach it.
debian_mirror() {
	if [[ -n ${DEBIAN_MIRROR:-} ]]; then
		echo "$DEBIAN_MIRROR"
		return 0
	fi
	local m
	m=$(grep -hsE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		grep -v -- '-security' | grep -oE 'https?://[^ ]+/debian/?' | head -n1 || true)
	if [[ -z $m ]]; then
		echo "no Debian mirror found in /etc/apt/sources.list{,.d/}; set DEBIAN_MIRROR to the archive URL this machine can reach" >&2
		return 1
	fi
	echo "${m%/}"
}
