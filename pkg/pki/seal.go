package pki

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Sealed token layout (all lengths fixed):
//
//	version (1) = 1 | ephemeral P-256 public key, uncompressed (65) | nonce (12) | AES-256-GCM ciphertext+tag
//
// The key is HKDF-SHA256(ECDH(ephemeral, recipient), salt = ephemeral public
// key || recipient public key, info = sealInfo). The binding is the GCM
// additional data: a box opens only with the binding it was sealed with.
const (
	sealVersion  = 1
	sealPubLen   = 65
	sealNonceLen = 12
	sealOverhead = 1 + sealPubLen + sealNonceLen + 16
	sealInfo     = "xenferry migration token v1"
	// MaxSealedLen bounds what Open accepts (tokens are small).
	MaxSealedLen = 4096
)

// ErrOpen: the sealed token does not open with this key and binding.
var ErrOpen = errors.New("pki: sealed token does not open")

// Binding is the canonical additional data that ties a sealed token to one
// migration, its domain, its two hosts and the recipient's role in it.
func Binding(migrationUID, domain, source, target, role string) []byte {
	var b []byte
	b = append(b, "xenferry-binding-v1"...)
	for _, f := range []string{migrationUID, domain, source, target, role} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// Seal encrypts token so that only the holder of pub's private key can read
// it, and only together with the same binding.
func Seal(pub *ecdsa.PublicKey, token, binding []byte) ([]byte, error) {
	rcpt, err := pub.ECDH()
	if err != nil {
		return nil, fmt.Errorf("pki: seal: recipient key: %w", err)
	}
	if rcpt.Curve() != ecdh.P256() {
		return nil, fmt.Errorf("pki: seal: %w: want P-256", ErrBadKey)
	}
	eph, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: seal: ephemeral key: %w", err)
	}
	aead, err := sealAEAD(eph, rcpt, eph.PublicKey().Bytes())
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+sealPubLen+sealNonceLen, sealOverhead+len(token))
	out[0] = sealVersion
	copy(out[1:], eph.PublicKey().Bytes())
	nonce := out[1+sealPubLen:]
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("pki: seal: nonce: %w", err)
	}
	return aead.Seal(out, nonce, token, binding), nil
}

// Open decrypts a token sealed for priv's public key with binding.
func Open(priv *ecdsa.PrivateKey, sealed, binding []byte) ([]byte, error) {
	if len(sealed) < sealOverhead || len(sealed) > MaxSealedLen || sealed[0] != sealVersion {
		return nil, fmt.Errorf("%w: malformed (%d bytes)", ErrOpen, len(sealed))
	}
	me, err := priv.ECDH()
	if err != nil {
		return nil, fmt.Errorf("pki: open: own key: %w", err)
	}
	ephPub, err := ecdh.P256().NewPublicKey(sealed[1 : 1+sealPubLen])
	if err != nil {
		return nil, fmt.Errorf("%w: ephemeral key: %w", ErrOpen, err)
	}
	aead, err := sealAEAD(me, ephPub, sealed[1:1+sealPubLen])
	if err != nil {
		return nil, err
	}
	nonce := sealed[1+sealPubLen : 1+sealPubLen+sealNonceLen]
	tok, err := aead.Open(nil, nonce, sealed[1+sealPubLen+sealNonceLen:], binding)
	if err != nil {
		return nil, ErrOpen
	}
	return tok, nil
}

// sealAEAD derives the box key from the shared secret of priv and peer;
// ephPub is the ephemeral public key (the sender's), which with the
// recipient's key salts the derivation.
func sealAEAD(priv *ecdh.PrivateKey, peer *ecdh.PublicKey, ephPub []byte) (cipher.AEAD, error) {
	shared, err := priv.ECDH(peer)
	if err != nil {
		return nil, fmt.Errorf("%w: ecdh: %w", ErrOpen, err)
	}
	// The recipient's public key is whichever of the two is not ephPub.
	rcpt := priv.PublicKey().Bytes()
	if string(rcpt) == string(ephPub) {
		rcpt = peer.Bytes()
	}
	salt := append(append([]byte{}, ephPub...), rcpt...)
	key, err := hkdf.Key(sha256.New, shared, salt, sealInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("pki: derive key: %w", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("pki: cipher: %w", err)
	}
	return cipher.NewGCM(block)
}
