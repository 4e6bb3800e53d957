// Command staticegress-gate is a chained CNI plugin that holds a new pod's
// sandbox until the staticegress agent has programmed this node since it
// booted.
//
// The agent keeps its fail-closed state (the nftables table that drops the
// traffic of pods it does not know yet) in the kernel, so a reboot erases it,
// and kubelet starts pods long before a restarted agent has listed anything.
// The agent appends this plugin to the node's active conflist; on ADD it
// passes the previous plugin's result through once the agent's ready file
// holds the current boot id, and otherwise fails with "try again later"
// (code 11) after waitSeconds, so kubelet retries the sandbox later. DEL,
// CHECK, GC and STATUS never wait: tearing a pod down must always work.
//
// It is written in Go, not Python like the rest of staticegress, because a CNI
// plugin is an executable the container runtime runs on the host before any
// container exists, ours included: it must be one static binary with no
// interpreter or libraries behind it. Standard library only; build with
//
//	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o staticegress-gate .
//
// Network configuration keys (besides cniVersion, name, type, prevResult):
//
//	readyFile    path the agent writes after its first complete sync since boot
//	             (default /run/staticegress/agent-ready); its content is the boot id
//	waitSeconds  how long ADD waits for it before failing (default 20)
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

const (
	pluginType         = "staticegress-gate"
	defaultReadyFile   = "/run/staticegress/agent-ready"
	defaultWaitSeconds = 20.0
	// The longest wait a config may ask for: kubelet gives the whole sandbox
	// setup a few minutes, and a plugin that outlives it only delays the retry.
	maxWaitSeconds = 120.0
	bootIDFile     = "/proc/sys/kernel/random/boot_id"
	pollInterval   = 100 * time.Millisecond
	maxInputBytes  = 1 << 20
	latestVersion  = "1.1.0"
)

var supportedVersions = []string{"0.4.0", "1.0.0", "1.1.0"}

// Error codes from the CNI specification.
const (
	codeIncompatibleVersion = 1
	codeInvalidEnvironment  = 4
	codeIOFailure           = 5
	codeDecodeFailure       = 6
	codeInvalidConfig       = 7
	codeTryAgainLater       = 11
)

type cniError struct {
	CNIVersion string `json:"cniVersion"`
	Code       int    `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details,omitempty"`
}

func (e *cniError) Error() string { return e.Msg }

type netConf struct {
	CNIVersion  string          `json:"cniVersion"`
	Name        string          `json:"name"`
	Type        string          `json:"type"`
	ReadyFile   string          `json:"readyFile"`
	WaitSeconds *float64        `json:"waitSeconds"`
	PrevResult  json.RawMessage `json:"prevResult"`
}

func main() {
	os.Exit(run(os.Getenv("CNI_COMMAND"), os.Stdin, os.Stdout, os.Stderr))
}

// run executes one CNI command and returns the exit code. Every failure is
// written to stdout as a CNI error document, as the runtime expects.
func run(command string, stdin io.Reader, stdout, stderr io.Writer) int {
	version := latestVersion
	fail := func(err *cniError) int {
		if err.CNIVersion == "" {
			err.CNIVersion = version
		}
		out, _ := json.Marshal(err)
		fmt.Fprintf(stdout, "%s\n", out)
		fmt.Fprintf(stderr, "%s: %s: %s\n", pluginType, err.Msg, err.Details)
		return 1
	}
	switch command {
	case "DEL", "GC":
		// Never block or fail a teardown, whatever the input: a pod that
		// cannot be removed is worse than anything this plugin guards.
		return 0
	case "VERSION":
		out, _ := json.Marshal(map[string]any{
			"cniVersion":        latestVersion,
			"supportedVersions": supportedVersions,
		})
		fmt.Fprintf(stdout, "%s\n", out)
		return 0
	case "ADD", "CHECK", "STATUS":
	case "":
		return fail(&cniError{Code: codeInvalidEnvironment, Msg: "CNI_COMMAND is not set"})
	default:
		return fail(&cniError{
			Code: codeInvalidEnvironment, Msg: "unknown CNI_COMMAND", Details: command,
		})
	}
	conf, cerr := parseConf(stdin)
	if conf != nil && supported(conf.CNIVersion) {
		version = conf.CNIVersion
	}
	if cerr != nil {
		return fail(cerr)
	}
	if command != "ADD" {
		return 0
	}
	if len(conf.PrevResult) == 0 || string(conf.PrevResult) == "null" {
		return fail(&cniError{
			Code: codeInvalidConfig,
			Msg:  pluginType + " must be chained after the plugins that set up the pod's network",
			Details: "no prevResult: it is the first plugin of network " +
				fmt.Sprintf("%q", conf.Name),
		})
	}
	result, cerr := withVersion(conf.PrevResult, conf.CNIVersion)
	if cerr != nil {
		return fail(cerr)
	}
	if cerr := waitReady(conf, stderr); cerr != nil {
		return fail(cerr)
	}
	fmt.Fprintf(stdout, "%s\n", result)
	return 0
}

func supported(version string) bool {
	for _, v := range supportedVersions {
		if v == version {
			return true
		}
	}
	return false
}

func parseConf(stdin io.Reader) (*netConf, *cniError) {
	data, err := io.ReadAll(io.LimitReader(stdin, maxInputBytes+1))
	if err != nil {
		return nil, &cniError{Code: codeIOFailure, Msg: "cannot read the network configuration", Details: err.Error()}
	}
	if len(data) > maxInputBytes {
		return nil, &cniError{Code: codeDecodeFailure, Msg: "network configuration larger than 1 MiB"}
	}
	conf := &netConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, &cniError{Code: codeDecodeFailure, Msg: "network configuration is not valid JSON", Details: err.Error()}
	}
	if !supported(conf.CNIVersion) {
		return conf, &cniError{
			Code:    codeIncompatibleVersion,
			Msg:     "unsupported cniVersion " + fmt.Sprintf("%q", conf.CNIVersion),
			Details: "supported: " + strings.Join(supportedVersions, ", "),
		}
	}
	if conf.ReadyFile == "" {
		conf.ReadyFile = defaultReadyFile
	}
	if conf.WaitSeconds == nil {
		w := defaultWaitSeconds
		conf.WaitSeconds = &w
	}
	if w := *conf.WaitSeconds; w < 0 || w > maxWaitSeconds {
		return conf, &cniError{
			Code:    codeInvalidConfig,
			Msg:     "waitSeconds out of range",
			Details: fmt.Sprintf("%v is not within 0..%v", w, maxWaitSeconds),
		}
	}
	return conf, nil
}

// withVersion returns the previous result with the configuration's
// cniVersion: the runtime has already converted it to that version, so
// everything else passes through untouched.
func withVersion(prev json.RawMessage, version string) ([]byte, *cniError) {
	var fields map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(prev))
	dec.UseNumber()
	if err := dec.Decode(&fields); err != nil || fields == nil {
		details := "not a JSON object"
		if err != nil {
			details = err.Error()
		}
		return nil, &cniError{Code: codeDecodeFailure, Msg: "prevResult is not a CNI result", Details: details}
	}
	v, _ := json.Marshal(version)
	fields["cniVersion"] = v
	out, err := json.Marshal(fields)
	if err != nil {
		return nil, &cniError{Code: codeDecodeFailure, Msg: "prevResult is not a CNI result", Details: err.Error()}
	}
	return out, nil
}

// waitReady polls the ready file until it holds this boot's id, for at most
// the configured time.
func waitReady(conf *netConf, stderr io.Writer) *cniError {
	boot, err := readTrimmed(bootIDFile)
	if err != nil || boot == "" {
		return &cniError{
			Code:    codeIOFailure,
			Msg:     "cannot read this boot's id, so cannot tell whether staticegress has programmed the node",
			Details: fmt.Sprint(bootIDFile, ": ", err),
		}
	}
	wait := time.Duration(*conf.WaitSeconds * float64(time.Second))
	deadline := time.Now().Add(wait)
	announced := false
	for {
		state := readyState(conf.ReadyFile, boot)
		if state == "" {
			return nil
		}
		if time.Now().After(deadline) || wait == 0 {
			return &cniError{
				Code: codeTryAgainLater,
				Msg:  "staticegress agent has not programmed this node since boot; pod held until it does",
				Details: fmt.Sprintf("%s (waited %v for %s to hold boot id %s)",
					state, wait, conf.ReadyFile, boot),
			}
		}
		if !announced {
			fmt.Fprintf(stderr, "%s: holding container %s: %s\n",
				pluginType, os.Getenv("CNI_CONTAINERID"), state)
			announced = true
		}
		time.Sleep(pollInterval)
	}
}

// readyState returns "" when the ready file holds the current boot id, and
// otherwise why not.
func readyState(path, boot string) string {
	got, err := readTrimmed(path)
	switch {
	case os.IsNotExist(err):
		return path + " does not exist"
	case err != nil:
		return "cannot read " + path + ": " + err.Error()
	case got == "":
		return path + " is empty"
	case got != boot:
		return fmt.Sprintf("%s holds boot id %q, from an earlier boot", path, got)
	}
	return ""
}

func readTrimmed(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(data)), nil
}
