package xlstream

import (
	"encoding/json"
	"fmt"
)

// XLDisk is a disk of the domain configuration in xl's header.
type XLDisk struct {
	PdevPath string `json:"pdev_path"` // path in dom0 (file or block device)
	Vdev     string `json:"vdev"`      // name in the guest (xvda, ...)
}

// Disks returns the disks of the libxl domain configuration carried in
// xl's header, in configuration order (the order REFs number them).
func (h *XLHeader) Disks() ([]XLDisk, error) {
	if h == nil || len(h.Config) == 0 {
		return nil, fmt.Errorf("%w: xl header carries no domain configuration", ErrBadHeader)
	}
	var c struct {
		Disks []XLDisk `json:"disks"`
	}
	if err := json.Unmarshal(h.Config, &c); err != nil {
		return nil, fmt.Errorf("%w: domain configuration in xl header: %v", ErrBadHeader, err)
	}
	return c.Disks, nil
}

// Name returns the domain's name from the configuration in xl's header.
func (h *XLHeader) Name() (string, error) {
	if h == nil || len(h.Config) == 0 {
		return "", fmt.Errorf("%w: xl header carries no domain configuration", ErrBadHeader)
	}
	var c struct {
		CInfo struct {
			Name string `json:"name"`
		} `json:"c_info"`
	}
	if err := json.Unmarshal(h.Config, &c); err != nil {
		return "", fmt.Errorf("%w: domain configuration in xl header: %v", ErrBadHeader, err)
	}
	if c.CInfo.Name == "" {
		return "", fmt.Errorf("%w: domain configuration without a name", ErrBadHeader)
	}
	return c.CInfo.Name, nil
}
