# net-agent: network slots (namespace, veth, tap, NAT, egress rules) and their ready pool, one per
# sandbox node.
#
#   nomad job run -var-file=deploy/nomad/node.vars.hcl deploy/nomad/net-agent.nomad.hcl
#
# Slots are reserved in Consul KV under the Nomad node ID, so a restarted agent (or a replaced
# allocation on the same node) finds the slots it already handed out.

# Shared by every sbx job, so one var-file serves them all: Nomad rejects a var-file that sets a
# variable the job does not declare (hashicorp/nomad#16136).
variable "sbx_root" {
  type        = string
  default     = "/opt/sbx"
  description = "Absolute path of the built checkout on every node (holds ./sbx, dist/, node_modules/)."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "node_pool" {
  type        = string
  default     = "default"
  description = "Node pool of the sandbox nodes (Nomad >= 1.6)."
}

variable "uffd_sockets" {
  type        = list(string)
  default     = ["/run/sbx/uffd-server-0.sock", "/run/sbx/uffd-server-1.sock"]
  description = "Control socket of each uffd-server instance on a node; one task group per entry."
}

variable "block_sockets" {
  type        = list(string)
  default     = ["/run/sbx/block-server-0.sock", "/run/sbx/block-server-1.sock"]
  description = "Control socket of each block-server instance on a node; one task group per entry."
}

variable "consul_addr" {
  type        = string
  default     = "http://127.0.0.1:8500"
  description = "HTTP address of the node's Consul agent, where slot reservations live."
}

job "sbx-net-agent" {
  type        = "system"
  datacenters = var.datacenters
  node_pool   = var.node_pool
  priority    = 80

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "net-agent" {
    network {
      port "metrics" {
        static = 9463
      }
    }

    # A node agent has nowhere else to go: keep restarting it in place, never give up.
    restart {
      attempts = 5
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "net-agent" {
      # raw_exec: network namespaces, veth/tap links, nftables and sysctls of the host's own network
      # namespace need root outside any isolation; see README.md "Driver".
      driver = "raw_exec"

      config {
        command = "${var.sbx_root}/sbx"
        args = [
          "net-agent", "serve",
          "--control-socket", "/run/sbx/net-agent.sock",
          "--node-id", "${node.unique.id}",
          "--reservation", "consul",
          "--consul-addr", "${var.consul_addr}",
          "--metrics-host", "${NOMAD_IP_metrics}",
          "--metrics-port", "${NOMAD_PORT_metrics}",
        ]
      }

      # Node-wide settings from the Nomad variable nomad/jobs, then this job's own from
      # nomad/jobs/sbx-net-agent (consul_token -> SBX_NET_AGENT_CONSUL_TOKEN, uplink ->
      # SBX_NET_AGENT_UPLINK). Both optional. noop: restart the task to apply a change.
      template {
        destination = "secrets/sbx.env"
        env         = false
        change_mode = "noop"
        data        = <<-EOT
          {{- if nomadVarExists "nomad/jobs" }}{{ with nomadVar "nomad/jobs" }}{{ range $k, $v := . }}
          SBX_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
          {{- if nomadVarExists "nomad/jobs/sbx-net-agent" }}{{ with nomadVar "nomad/jobs/sbx-net-agent" }}{{ range $k, $v := . }}
          SBX_NET_AGENT_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
        EOT
      }

      # The launcher reads the rendered file at every start (a restart after `nomad var put` too;
      # `env = true` is read by Nomad once per allocation). tools/sbx/src/env-file.ts
      env {
        SBX_ENV_FILE = "${NOMAD_SECRETS_DIR}/sbx.env"
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 500
        memory = 256
      }

      service {
        name = "sbx-net-agent"
        port = "metrics"
        tags = ["sbx", "metrics"]
        meta {
          socket       = "/run/sbx/net-agent.sock"
          metrics_path = "/metrics"
          metrics_prefix = "sbx_net_agent_"
        }

        check {
          name     = "grpc-health"
          type     = "script"
          command  = "${var.sbx_root}/sbx"
          args     = ["health", "/run/sbx/net-agent.sock"]
          # `sbx health` is a node process: about 1.5 s on an idle node, over 5 s on a loaded
          # 2-core one (seen under Nomad: every script check timed out and check_restart looped).
          interval = "15s"
          timeout  = "10s"

          check_restart {
            limit = 3
            grace = "30s"
          }
        }
      }
    }
  }
}
