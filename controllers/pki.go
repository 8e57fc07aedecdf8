package controllers

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

// Keys of the CA Secret: the layout of a kubernetes.io/tls Secret as
// cert-manager writes it for a CA Certificate.
const (
	SecretCertKey   = "tls.crt"
	SecretKeyKey    = "tls.key"
	SecretBundleKey = "ca.crt"
	// DefaultCASecretName is the CA Secret's default name (RBAC grants get
	// and update on this name only).
	DefaultCASecretName = "xenferry-ca"
	// certManagerAnnotation marks a Secret cert-manager issued; such a CA is
	// used as it is and rotated by cert-manager, never by this controller.
	certManagerAnnotation = "cert-manager.io/certificate-name"
	// pkiRecheck bounds the time between two looks at one host, so a
	// rotated CA reaches every host's bundle within it.
	pkiRecheck = time.Hour
)

// errNoCertificate: a host has no usable certificate yet (its agent has
// not published a CSR, or it was not signed); migrations to or from it wait.
var errNoCertificate = errors.New("no usable certificate")

// PKIReconciler is the cluster's certificate authority for node agents. It
// keeps the CA in a Secret of the operator's namespace (created if absent,
// or provided by cert-manager), signs each XenHost's CSR when the CSR names
// that XenHost, and renews the certificates and its own CA before they
// expire. The VMMigration controller asks it for the hosts' certified keys
// to seal tokens to.
type PKIReconciler struct {
	Client client.Client
	// APIReader reads the CA Secret by name: no cluster-wide Secret watch.
	APIReader client.Reader
	Recorder  events.EventRecorder
	Clock     clock.PassiveClock
	// Namespace and SecretName locate the CA Secret.
	Namespace  string
	SecretName string
	// CertLifetime of agent certificates; CALifetime of a CA created here.
	CertLifetime time.Duration
	CALifetime   time.Duration

	// kick re-queues XenHosts when the bundle changed (a rotated CA, an
	// expired one dropped), so every host moves to it together rather than
	// at its own next look. Bounded; a host that does not fit is seen at
	// its periodic recheck.
	kick chan event.GenericEvent

	// mu protects seen and lastBundle.
	mu sync.Mutex
	// lastBundle is the bundle last handed out.
	lastBundle string
	// seen keeps the CA certificates of a cert-manager Secret met so far,
	// by DER, until they expire: a CA cert-manager replaced stays trusted
	// while the agents' certificates move to the new one. Bounded by the
	// CA rotations within one CA lifetime.
	seen map[string]*x509.Certificate
}

// caState is the CA in force and the bundle agents trust.
type caState struct {
	ca     *pki.CA
	bundle []byte
	roots  *x509.CertPool
}

// +kubebuilder:rbac:groups=migration.xenferry.io,resources=xenhosts,verbs=get;list;watch
// +kubebuilder:rbac:groups=migration.xenferry.io,resources=xenhosts/status,verbs=get;update;patch

// SetupWithManager registers the reconciler; zero fields get defaults.
func (p *PKIReconciler) SetupWithManager(mgr ctrlbuilder.Manager) error {
	p.defaults(mgr)
	if p.Namespace == "" {
		return errors.New("pki: the CA Secret's namespace is not set")
	}
	// Only the certificate exchange matters here, not the heartbeats.
	tlsChanged := predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			o, ok1 := e.ObjectOld.(*v1.XenHost)
			n, ok2 := e.ObjectNew.(*v1.XenHost)
			return !ok1 || !ok2 || !equalTLS(o.Status.TLS, n.Status.TLS)
		},
	}
	p.kick = make(chan event.GenericEvent, 1024)
	return ctrlbuilder.NewControllerManagedBy(mgr).
		For(&v1.XenHost{}, builder.WithPredicates(tlsChanged)).
		WatchesRawSource(source.Channel(p.kick, &handler.EnqueueRequestForObject{})).
		Named("xenhost-pki").
		Complete(p)
}

func (p *PKIReconciler) defaults(mgr ctrlbuilder.Manager) {
	if p.Client == nil && mgr != nil {
		p.Client = mgr.GetClient()
	}
	if p.APIReader == nil && mgr != nil {
		p.APIReader = mgr.GetAPIReader()
	}
	if p.Recorder == nil && mgr != nil {
		p.Recorder = mgr.GetEventRecorder("xenferry-pki")
	}
	if p.Clock == nil {
		p.Clock = clock.RealClock{}
	}
	if p.SecretName == "" {
		p.SecretName = DefaultCASecretName
	}
	if p.CertLifetime == 0 {
		p.CertLifetime = pki.DefaultCertLifetime
	}
	if p.CALifetime == 0 {
		p.CALifetime = pki.DefaultCALifetime
	}
}

func equalTLS(a, b *v1.HostTLS) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.CSR == b.CSR && a.Certificate == b.Certificate && a.CABundle == b.CABundle
}

// Reconcile signs one XenHost's CSR when its certificate is missing, for
// another key, from an older CA, or due for renewal.
func (p *PKIReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	log := ctrllog.FromContext(ctx)
	h := &v1.XenHost{}
	if err := p.Client.Get(ctx, req.NamespacedName, h); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if h.Status.TLS == nil || h.Status.TLS.CSR == "" {
		return reconcile.Result{}, nil // the agent has not asked yet
	}
	now := p.Clock.Now()
	st, err := p.loadCA(ctx, now)
	if err != nil {
		return reconcile.Result{}, err
	}
	csr, err := pki.ParseCSR([]byte(h.Status.TLS.CSR))
	if err != nil {
		p.refuse(h, fmt.Sprintf("Refused the certificate request of XenHost %s: %v", h.Name, err))
		return reconcile.Result{}, nil
	}
	if csr.Subject.CommonName != h.Name {
		p.refuse(h, fmt.Sprintf("Refused the certificate request of XenHost %s: it asks for %q; an agent may only ask for its own host's name", h.Name, csr.Subject.CommonName))
		return reconcile.Result{}, nil
	}
	if cert, ok := p.current(h, st, csr.PublicKey, now); ok {
		return reconcile.Result{RequeueAfter: min(pkiRecheck, max(time.Second, pki.RenewAt(cert).Sub(now)))}, nil
	}
	certPEM, err := st.ca.Sign([]byte(h.Status.TLS.CSR), h.Name, now, p.CertLifetime)
	if err != nil {
		p.refuse(h, fmt.Sprintf("Refused the certificate request of XenHost %s: %v", h.Name, err))
		return reconcile.Result{}, nil
	}
	cert, _ := pki.ParseCertPEM(certPEM)
	orig := h.DeepCopy()
	h.Status.TLS.Certificate = string(certPEM)
	h.Status.TLS.CABundle = string(st.bundle)
	h.Status.TLS.NotAfter = &metav1.Time{Time: cert.NotAfter}
	// A merge patch of the controller's fields: the agent's CSR and its
	// heartbeat are left alone.
	if err := p.Client.Status().Patch(ctx, h, client.MergeFrom(orig)); err != nil {
		return reconcile.Result{}, fmt.Errorf("write certificate of XenHost %s: %w", klog.KObj(h), err)
	}
	log.Info("Issued agent certificate", "XenHost", klog.KObj(h), "serial", cert.SerialNumber.Text(16), "notAfter", cert.NotAfter)
	p.event(h, corev1.EventTypeNormal, "CertificateIssued", fmt.Sprintf("Issued a certificate for %s valid until %s", h.Name, cert.NotAfter.UTC().Format(time.RFC3339)))
	return reconcile.Result{RequeueAfter: min(pkiRecheck, max(time.Second, pki.RenewAt(cert).Sub(now)))}, nil
}

// current reports whether h's certificate is in order: for the CSR's key,
// issued by the CA in force, not due for renewal, with the current bundle.
func (p *PKIReconciler) current(h *v1.XenHost, st *caState, csrKey any, now time.Time) (*x509.Certificate, bool) {
	t := h.Status.TLS
	if t.Certificate == "" || t.CABundle != string(st.bundle) {
		return nil, false
	}
	cert, err := pki.ParseCertPEM([]byte(t.Certificate))
	if err != nil || !pki.SamePublicKey(csrKey, cert.PublicKey) || cert.CheckSignatureFrom(st.ca.Cert) != nil ||
		cert.Subject.CommonName != h.Name || pki.NeedsRenewal(cert, now) {
		return nil, false
	}
	return cert, true
}

func (p *PKIReconciler) refuse(h *v1.XenHost, msg string) {
	p.event(h, corev1.EventTypeWarning, "CertificateRefused", msg)
}

func (p *PKIReconciler) event(h *v1.XenHost, typ, reason, msg string) {
	if p.Recorder != nil {
		p.Recorder.Eventf(h, nil, typ, reason, "Certificate", "%s", msg)
	}
}

// HostKey returns the certified public key of h: its certificate verifies
// against the CA bundle for h's name and is valid now. Tokens are sealed to
// it. An error wraps errNoCertificate when h has none usable.
func (p *PKIReconciler) HostKey(ctx context.Context, h *v1.XenHost) (*ecdsa.PublicKey, string, error) {
	if h.Status.TLS == nil || h.Status.TLS.Certificate == "" {
		return nil, "", fmt.Errorf("XenHost %s: %w: its agent has not received one yet", h.Name, errNoCertificate)
	}
	now := p.Clock.Now()
	st, err := p.loadCA(ctx, now)
	if err != nil {
		return nil, "", err
	}
	pub, cert, err := pki.VerifyHost([]byte(h.Status.TLS.Certificate), st.roots, h.Name, now)
	if err != nil {
		return nil, "", fmt.Errorf("XenHost %s: %w: %w", h.Name, errNoCertificate, err)
	}
	return pub, cert.SerialNumber.Text(16), nil
}

// loadCA reads the CA Secret, creating it when absent and rotating a CA
// this controller made once it is due; the bundle keeps every CA met that
// has not expired.
func (p *PKIReconciler) loadCA(ctx context.Context, now time.Time) (*caState, error) {
	key := types.NamespacedName{Namespace: p.Namespace, Name: p.SecretName}
	sec := &corev1.Secret{}
	err := p.APIReader.Get(ctx, key, sec)
	if apierrors.IsNotFound(err) {
		if sec, err = p.createCA(ctx, key, now); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("get CA Secret %s: %w", key, err)
	}
	ca, err := pki.LoadCA(sec.Data[SecretCertKey], sec.Data[SecretKeyKey])
	if err != nil {
		return nil, fmt.Errorf("CA Secret %s: %w", key, err)
	}
	external := sec.Annotations[certManagerAnnotation] != ""
	if !external && pki.NeedsRenewal(ca.Cert, now) {
		if ca, err = p.rotateCA(ctx, sec, ca, now); err != nil {
			return nil, err
		}
	}
	st, err := p.bundle(sec, ca, now, external)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	changed := p.lastBundle != "" && p.lastBundle != string(st.bundle)
	p.lastBundle = string(st.bundle)
	p.mu.Unlock()
	if changed {
		p.requeueAll(ctx)
	}
	return st, nil
}

// requeueAll asks for a look at every XenHost (from the cache); never blocks.
func (p *PKIReconciler) requeueAll(ctx context.Context) {
	if p.kick == nil {
		return
	}
	var hosts v1.XenHostList
	if err := p.Client.List(ctx, &hosts); err != nil {
		ctrllog.FromContext(ctx).Error(err, "Listing XenHosts after a CA change failed; they move at their periodic recheck")
		return
	}
	for i := range hosts.Items {
		select {
		case p.kick <- event.GenericEvent{Object: &hosts.Items[i]}:
		default:
			return
		}
	}
}

func (p *PKIReconciler) createCA(ctx context.Context, key types.NamespacedName, now time.Time) (*corev1.Secret, error) {
	ca, err := pki.NewCA("xenferry-agents-ca", now, p.CALifetime)
	if err != nil {
		return nil, err
	}
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		return nil, err
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name},
		Type:       corev1.SecretTypeTLS,
		Data:       map[string][]byte{SecretCertKey: ca.CertPEM, SecretKeyKey: keyPEM, SecretBundleKey: ca.CertPEM},
	}
	if err := p.Client.Create(ctx, sec); err != nil {
		if apierrors.IsAlreadyExists(err) {
			// Another replica made it first: use theirs.
			got := &corev1.Secret{}
			if err := p.APIReader.Get(ctx, key, got); err != nil {
				return nil, fmt.Errorf("get CA Secret %s: %w", key, err)
			}
			return got, nil
		}
		return nil, fmt.Errorf("create CA Secret %s: %w", key, err)
	}
	ctrllog.FromContext(ctx).Info("Created the agents' CA", "secret", key.String(), "notAfter", ca.Cert.NotAfter)
	return sec, nil
}

// rotateCA replaces a CA due for renewal; the old one stays in ca.crt until
// it expires, so agents' certificates it issued keep working meanwhile.
func (p *PKIReconciler) rotateCA(ctx context.Context, sec *corev1.Secret, old *pki.CA, now time.Time) (*pki.CA, error) {
	ca, err := pki.NewCA("xenferry-agents-ca", now, p.CALifetime)
	if err != nil {
		return nil, err
	}
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		return nil, err
	}
	bundle := append(append([]byte{}, ca.CertPEM...), sec.Data[SecretBundleKey]...)
	if !bytes.Contains(bundle, old.CertPEM) {
		bundle = append(bundle, old.CertPEM...)
	}
	upd := sec.DeepCopy()
	upd.Data[SecretCertKey], upd.Data[SecretKeyKey], upd.Data[SecretBundleKey] = ca.CertPEM, keyPEM, bundle
	// Update carries the resourceVersion: two replicas cannot both rotate.
	if err := p.Client.Update(ctx, upd); err != nil {
		return nil, fmt.Errorf("rotate CA in Secret %s/%s: %w", sec.Namespace, sec.Name, err)
	}
	*sec = *upd
	ctrllog.FromContext(ctx).Info("Rotated the agents' CA", "secret", client.ObjectKeyFromObject(sec).String(),
		"oldNotAfter", old.Cert.NotAfter, "notAfter", ca.Cert.NotAfter)
	return ca, nil
}

// bundle is the CA in force first, then every other CA of the Secret's
// ca.crt that has not expired. For a cert-manager CA (external), CAs met
// in earlier reads are added too, since cert-manager's ca.crt forgets the
// previous CA at once; for the controller's own Secret, ca.crt is the whole
// truth, so deleting the Secret (a new CA) stops trusting the old one.
func (p *PKIReconciler) bundle(sec *corev1.Secret, ca *pki.CA, now time.Time, external bool) (*caState, error) {
	cands := map[string]*x509.Certificate{}
	if b := sec.Data[SecretBundleKey]; len(b) > 0 {
		certs, err := pki.ParseCertsPEM(b)
		if err != nil {
			return nil, fmt.Errorf("CA Secret %s/%s: %s: %w", sec.Namespace, sec.Name, SecretBundleKey, err)
		}
		for _, c := range certs {
			if c.IsCA {
				cands[string(c.Raw)] = c
			}
		}
	}
	if external {
		p.mu.Lock()
		if p.seen == nil {
			p.seen = map[string]*x509.Certificate{}
		}
		p.seen[string(ca.Cert.Raw)] = ca.Cert
		for k, c := range cands {
			p.seen[k] = c
		}
		for k, c := range p.seen {
			if !now.Before(c.NotAfter) {
				delete(p.seen, k)
				continue
			}
			cands[k] = c
		}
		p.mu.Unlock()
	}
	st := &caState{ca: ca, roots: x509.NewCertPool()}
	add := func(c *x509.Certificate) {
		st.bundle = append(st.bundle, pemCert(c)...)
		st.roots.AddCert(c)
	}
	add(ca.Cert)
	var others []*x509.Certificate
	for _, c := range cands {
		if now.Before(c.NotAfter) && !c.Equal(ca.Cert) {
			others = append(others, c)
		}
	}
	// A stable order: the bundle is compared byte for byte.
	sortCerts(others)
	for _, c := range others {
		add(c)
	}
	return st, nil
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func sortCerts(cs []*x509.Certificate) {
	slices.SortFunc(cs, func(a, b *x509.Certificate) int {
		if c := a.NotAfter.Compare(b.NotAfter); c != 0 {
			return -c // the longest-lived first
		}
		return bytes.Compare(a.Raw, b.Raw)
	})
}
