//go:build tools

// Package tools pins the Kubernetes commands that staticegress builds for its
// local test bed (the control plane, and kubelet and kube-proxy for the lab's
// real-runtime nodes); it is never compiled into a program.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
