package agent

// The stand-in xl's toolstack commands, enough for the Xen backend
// (pkg/xenmem/xen) and the agent's xl path: info, list, list -l, destroy,
// rename and unpause over the domains in $FAKE_XL_DIR (a file per domain,
// its state; cfg/NAME.json its libxl configuration).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

func fakeConfigPath(name string) string {
	return filepath.Join(os.Getenv("FAKE_XL_DIR"), "cfg", name+".json")
}

func fakeSetConfig(name string, cfg []byte) {
	_ = os.MkdirAll(filepath.Dir(fakeConfigPath(name)), 0o755)
	_ = os.WriteFile(fakeConfigPath(name), cfg, 0o644)
}

// fakeConfigName is c_info.name of a libxl configuration.
func fakeConfigName(cfg []byte) string {
	var c struct {
		CInfo struct {
			Name string `json:"name"`
		} `json:"c_info"`
	}
	_ = json.Unmarshal(cfg, &c)
	return c.CInfo.Name
}

// fakeBaseName strips xl's migration suffixes.
func fakeBaseName(name string) string {
	for _, suf := range []string{"--incoming", "--migratedaway"} {
		name = strings.TrimSuffix(name, suf)
	}
	return name
}

func fakeDomains() []string {
	ents, _ := os.ReadDir(os.Getenv("FAKE_XL_DIR"))
	var names []string
	for _, e := range ents {
		if !e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names
}

func fakeToolstack(args []string) int {
	switch {
	case args[0] == "info":
		b, err := os.ReadFile(os.Getenv("FAKE_XL_INFO"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake xl info:", err)
			return 1
		}
		os.Stdout.Write(b)
		return 0
	case args[0] == "list" && len(args) == 2 && args[1] == "-l":
		type entry struct {
			DomID  int             `json:"domid"`
			Config json.RawMessage `json:"config"`
		}
		out := []entry{{DomID: 0, Config: json.RawMessage(`{"c_info":{"type":"pv","name":"Domain-0"},"b_info":{"max_memkb":524288,"target_memkb":524287}}`)}}
		for i, n := range fakeDomains() {
			b, err := os.ReadFile(fakeConfigPath(fakeBaseName(n)))
			if err != nil {
				continue
			}
			var c map[string]any
			if json.Unmarshal(b, &c) != nil {
				continue
			}
			if ci, ok := c["c_info"].(map[string]any); ok {
				ci["name"] = n
			}
			cb, _ := json.Marshal(c)
			out = append(out, entry{DomID: i + 1, Config: cb})
		}
		b, _ := json.MarshalIndent(out, "", "    ")
		os.Stdout.Write(append(b, '\n'))
		return 0
	case args[0] == "list" && len(args) == 1:
		fmt.Println("Name                                        ID   Mem VCPUs\tState\tTime(s)")
		fmt.Printf("%-40s %5d %5d %5d     %s %9.1f\n", "Domain-0", 0, 512, 1, "r-----", 1.0)
		for i, n := range fakeDomains() {
			st, _ := fakeDomainState(n)
			flags := "-b----"
			if st != "running" {
				flags = "--p---"
			}
			fmt.Printf("%-40s %5d %5d %5d     %s %9.1f\n", n, i+1, 128, 1, flags, 1.0)
		}
		return 0
	case args[0] == "destroy" && len(args) == 2:
		if _, ok := fakeDomainState(args[1]); !ok {
			fmt.Fprintf(os.Stderr, "invalid domain identifier (rc=-6): %s\n", args[1])
			return 1
		}
		fakeSetDomain(args[1], "")
		return 0
	case args[0] == "rename" && len(args) == 3:
		st, ok := fakeDomainState(args[1])
		if !ok {
			fmt.Fprintf(os.Stderr, "invalid domain identifier (rc=-6): %s\n", args[1])
			return 1
		}
		fakeSetDomain(args[1], "")
		fakeSetDomain(args[2], st)
		return 0
	case args[0] == "unpause" && len(args) == 2:
		if _, ok := fakeDomainState(args[1]); !ok {
			fmt.Fprintf(os.Stderr, "invalid domain identifier (rc=-6): %s\n", args[1])
			return 1
		}
		fakeSetDomain(args[1], "running")
		return 0
	}
	fmt.Fprintf(os.Stderr, "fake xl: unsupported %q\n", args)
	return 2
}
