package agent

import (
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

func xenDomain() *v1.XenDomain {
	return &v1.XenDomain{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", Labels: map[string]string{"app": "web"}},
		Spec: v1.XenDomainSpec{DomainName: "web", UUID: "u-1", MemoryBytes: 64 << 20, VCPUs: 2,
			Disks: []v1.DomainDisk{{ID: "xvda", Path: "/shared/web.img"}}},
		Status: v1.XenDomainStatus{Host: "host-a"},
	}
}

// The grant is the API's domain, its disks mapped to this host; the
// sender has no say in it.
func TestGrantForMapsTheAPIDomain(t *testing.T) {
	g, err := grantFor(xenDomain(), "host-a", func(d v1.DomainDisk) (string, error) { return "/mnt/b" + d.Path, nil })
	if err != nil {
		t.Fatal(err)
	}
	d := g.Domain
	if d.Name != "web" || d.MemoryBytes != 64<<20 || d.VCPUs != 2 || d.UUID != "u-1" || d.Namespace != "ns" || g.SourceHost != "host-a" {
		t.Fatalf("grant %+v", g)
	}
	if len(d.Disks) != 1 || d.Disks[0].ID != "xvda" || d.Disks[0].Path != "/mnt/b/shared/web.img" {
		t.Fatalf("disks %+v, want xvda at this host's path", d.Disks)
	}
}

func TestGrantForRefusesWhatTheAPIDoesNotSay(t *testing.T) {
	for name, tc := range map[string]struct {
		edit   func(*v1.XenDomain)
		source string
		want   string
	}{
		"domain elsewhere":  {func(*v1.XenDomain) {}, "host-c", `runs on "host-a"`},
		"no memory":         {func(x *v1.XenDomain) { x.Spec.MemoryBytes = 0 }, "host-a", "positive multiple"},
		"odd memory":        {func(x *v1.XenDomain) { x.Spec.MemoryBytes = 4097 }, "host-a", "positive multiple"},
		"no vcpus":          {func(x *v1.XenDomain) { x.Spec.VCPUs = 0 }, "host-a", "vCPUs"},
		"relative disk":     {func(x *v1.XenDomain) { x.Spec.Disks[0].Path = "web.img" }, "host-a", "clean absolute"},
		"dotdot disk":       {func(x *v1.XenDomain) { x.Spec.Disks[0].Path = "/shared/../dev/sda" }, "host-a", "clean absolute"},
		"repeated disk ids": {func(x *v1.XenDomain) { x.Spec.Disks = append(x.Spec.Disks, x.Spec.Disks[0]) }, "host-a", "repeated id"},
	} {
		t.Run(name, func(t *testing.T) {
			xd := xenDomain()
			tc.edit(xd)
			if _, err := grantFor(xd, tc.source, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

// A token opens one main connection; the migration's other connections
// come from the same peer.
func TestTokenSingleUse(t *testing.T) {
	var u tokenUses
	if err := u.follow("m1", ""); err == nil {
		t.Fatal("a data connection before the main one was admitted")
	}
	if err := u.claim("m1", "host-a"); err != nil {
		t.Fatal(err)
	}
	if err := u.claim("m1", "host-a"); err == nil || !strings.Contains(err.Error(), "single use") {
		t.Fatalf("second main connection: %v", err)
	}
	if err := u.follow("m1", "host-a"); err != nil {
		t.Fatal(err)
	}
	if err := u.follow("m1", "host-x"); err == nil {
		t.Fatal("a connection from another peer was admitted")
	}
	u.prune(func(string) bool { return false })
	if err := u.follow("m1", "host-a"); err == nil {
		t.Fatal("pruned use still admits")
	}
}
