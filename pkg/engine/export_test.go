package engine

// SetTestAfterInstall makes f run after each post-copy install at the
// destination, before the installed pages are accounted (see
// testAfterInstall); the returned function removes it.
func SetTestAfterInstall(f func(prio bool, pfns []uint64)) (restore func()) {
	testAfterInstall.Store(&f)
	return func() { testAfterInstall.Store(nil) }
}
