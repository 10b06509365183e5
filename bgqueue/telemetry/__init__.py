"""What the processes report as they go: request-tagged logs (`logs`) and Prometheus
metrics (`metrics`). Beat and the run core feed them; the CLI serves them. Traces are
`bgqueue.tracing`, lower down, because producers and transient delays make spans too."""
