package main

import "github.com/xenferry/xenferry/internal/agent"

// Tools: lab certificates, the backend's view of the host, sim cleanup.
func init() {
	registerCommand(command{name: "pki", short: "lab certificates: pki ca --dir D | pki issue --dir D --name HOST [--ip IP,...] [--dns NAME,...]", run: agent.PKI})
	registerCommand(command{name: "inventory", short: "print the host and its domains as the backend sees them (JSON)", run: agent.Inventory})
	registerCommand(command{name: "sim-destroy", short: "destroy the simulated domains registered under a state dir (their guests outlive the agent)", run: agent.SimDestroy})
}
