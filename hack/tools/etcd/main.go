// Command etcd is etcd built from the Go module proxy: etcd's own main
// module is served only up to v3.6, so this calls the server's entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
