package ingress

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

// selfSignedCert makes the certificate served when no Secret matches the
// SNI name (or a named Secret is missing or invalid): clients see an
// obviously untrusted certificate instead of another site's.
func selfSignedCert(node string) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, err
	}
	cn := "knit ingress default certificate"
	if node != "" {
		cn += " (" + node + ")"
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"knit"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{"ingress.knit.invalid"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, nil
}

// certCache keeps parsed key pairs by Secret and resourceVersion, so a
// rebuild only parses the Secrets that changed. Owned by the sync loop.
type certCache struct {
	entries map[types.NamespacedName]certEntry
}

type certEntry struct {
	rv   string
	cert *tls.Certificate
	err  error
	seen bool
}

func newCertCache() *certCache {
	return &certCache{entries: map[types.NamespacedName]certEntry{}}
}

// get parses (or recalls) the key pair in a kubernetes.io/tls Secret.
func (c *certCache) get(s *corev1.Secret) (*tls.Certificate, error) {
	key := types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
	if e, ok := c.entries[key]; ok && e.rv == s.ResourceVersion && s.ResourceVersion != "" {
		e.seen = true
		c.entries[key] = e
		return e.cert, e.err
	}
	cert, err := parseTLSSecret(s)
	c.entries[key] = certEntry{rv: s.ResourceVersion, cert: cert, err: err, seen: true}
	return cert, err
}

// sweep forgets the Secrets not used since the last sweep.
func (c *certCache) sweep() {
	for k, e := range c.entries {
		if !e.seen {
			delete(c.entries, k)
			continue
		}
		e.seen = false
		c.entries[k] = e
	}
}

func parseTLSSecret(s *corev1.Secret) (*tls.Certificate, error) {
	if s.Type != corev1.SecretTypeTLS {
		return nil, fmt.Errorf("type is %q, not %s", s.Type, corev1.SecretTypeTLS)
	}
	crt, key := s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey]
	if len(crt) == 0 || len(key) == 0 {
		return nil, errors.New("tls.crt or tls.key is empty")
	}
	cert, err := tls.X509KeyPair(crt, key)
	if err != nil {
		return nil, err
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, err
		}
	}
	if time.Now().After(cert.Leaf.NotAfter) {
		return nil, fmt.Errorf("certificate expired at %s", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return &cert, nil
}

// certCovers reports whether the certificate is valid for host (possibly a
// wildcard rule host).
func certCovers(cert *tls.Certificate, host string) bool {
	if cert.Leaf == nil {
		return true
	}
	if strings.HasPrefix(host, "*.") {
		for _, n := range cert.Leaf.DNSNames {
			if strings.EqualFold(n, host) {
				return true
			}
		}
		return false
	}
	return cert.Leaf.VerifyHostname(host) == nil
}
