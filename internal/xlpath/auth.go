package xlpath

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Auth is what an agent's transport sends first on an xl connection, before
// xl's request: the migration it belongs to and the token the controller
// issued for it. The receiving agent checks both (and the peer's
// certificate) before it runs anything.
type Auth struct {
	Migration string `json:"migration"`
	Token     []byte `json:"token"`
}

// authMagic starts an auth frame; it differs from the hello of the
// standalone transport, so each side refuses the other's mode clearly.
var authMagic = [4]byte{'X', 'F', 'A', '1'}

// maxAuth bounds an auth frame's body: a UID and a 32-byte token need far
// less; nothing a peer sends decides an allocation beyond it.
const maxAuth = 4 << 10

// ErrBadAuth: the peer's first frame is not a well-formed auth frame.
var ErrBadAuth = errors.New("xlpath: bad auth frame")

// WriteAuth writes an auth frame.
func WriteAuth(w io.Writer, a Auth) error {
	body, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if len(body) > maxAuth {
		return fmt.Errorf("%w: %d bytes", ErrBadAuth, len(body))
	}
	hdr := make([]byte, 8)
	copy(hdr, authMagic[:])
	binary.BigEndian.PutUint32(hdr[4:], uint32(len(body)))
	if _, err := w.Write(append(hdr, body...)); err != nil {
		return fmt.Errorf("send auth: %w", err)
	}
	return nil
}

// ReadAuth reads an auth frame.
func ReadAuth(r io.Reader) (Auth, error) {
	var a Auth
	hdr := make([]byte, 8)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return a, fmt.Errorf("%w: %w", ErrBadAuth, err)
	}
	if [4]byte(hdr[:4]) != authMagic {
		return a, fmt.Errorf("%w: no auth magic (a standalone xl-send? the agent needs its --auth-file)", ErrBadAuth)
	}
	n := binary.BigEndian.Uint32(hdr[4:])
	if n == 0 || n > maxAuth {
		return a, fmt.Errorf("%w: body of %d bytes", ErrBadAuth, n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return a, fmt.Errorf("%w: %w", ErrBadAuth, err)
	}
	if err := json.Unmarshal(body, &a); err != nil {
		return a, fmt.Errorf("%w: %w", ErrBadAuth, err)
	}
	if a.Migration == "" || len(a.Token) == 0 {
		return a, fmt.Errorf("%w: no migration or token", ErrBadAuth)
	}
	return a, nil
}
