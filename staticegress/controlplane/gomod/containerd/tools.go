//go:build tools

// Package tools pins the container runtime commands that staticegress builds
// for its lab's real-runtime nodes; it is never compiled into a program. A
// module of its own keeps containerd's dependency versions from moving the
// Kubernetes binaries' ones.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
