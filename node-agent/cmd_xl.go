package main

import "github.com/xenferry/xenferry/internal/agent"

// The transport of stock `xl migrate` and its dedup index.
func init() {
	registerCommand(command{name: "xl-send", short: "transport for `xl migrate -s` (source side; HOST xl migrate-receive ...)", run: agent.XLSend})
	registerCommand(command{name: "xl-recv", short: "receive `xl migrate -s \"node-agent xl-send\"` migrations and run xl migrate-receive", run: agent.XLRecv})
	registerCommand(command{name: "xl-index", short: "build (or load) the persisted dedup index of disks: xl-index DISK...", run: agent.XLIndex})
}
