package main

import (
	"slices"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// Every process of the fleet runs in this program's namespace, on
// loopback (labkit.Procs, labkit.ControlPlane). The controller is given
// POD_NAMESPACE explicitly, so an inherited one must not reach any child.
var envDrop = slices.Concat(labkit.EnvDrop, []string{"POD_NAMESPACE="})

// cleanEnv is this process's environment for a child: without the
// variables envDrop names, followed by extra.
func cleanEnv(extra ...string) []string { return labkit.CleanEnv(envDrop, extra...) }
