//go:build tools

// Package tools pins the Kubernetes control-plane commands that staticegress
// builds for its local test bed; it is never compiled into a program.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
