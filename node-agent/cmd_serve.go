package main

import "github.com/xenferry/xenferry/internal/agent"

// The standalone data path: no Kubernetes, a local control socket.
func init() {
	registerCommand(command{name: "serve", short: "serve migrations without Kubernetes (data port + local control socket)", run: agent.Serve})
	registerCommand(command{name: "migrate", short: "migrate a domain of the local agent to another agent", run: agent.Migrate})
	registerCommand(command{name: "resolve", short: "resume (--reclaim) or destroy (--release) a domain a failed migration left paused after go", run: agent.Resolve})
}
