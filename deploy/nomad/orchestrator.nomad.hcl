# orchestrator: the node's SandboxService gRPC API (what the control plane calls) and the sandbox
# lifecycle, one per sandbox node. It drives the other four services through their control sockets
# in /run/sbx, so run it with the same var-file as the uffd-server and block-server jobs: the
# socket lists must agree.
#
#   nomad job run -var-file=deploy/nomad/node.vars.hcl deploy/nomad/orchestrator.nomad.hcl

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

variable "grpc_port" {
  type        = number
  default     = 5008
  description = "TCP port of the SandboxService API on every node."
}

job "sbx-orchestrator" {
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

  group "orchestrator" {
    network {
      port "grpc" {
        static = var.grpc_port
      }
      port "metrics" {
        static = 9460
      }
    }

    # A node agent has nowhere else to go: keep restarting it in place, never give up.
    restart {
      attempts = 5
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "orchestrator" {
      # raw_exec: starts Firecracker (KVM, jailer), enters the slots' network namespaces and owns
      # sandbox files as root; see README.md "Driver".
      driver = "raw_exec"

      config {
        command = "${var.sbx_root}/sbx"
        args = [
          "orchestrator", "serve",
          "--grpc-port", "${NOMAD_PORT_grpc}",
          "--control-socket", "/run/sbx/orchestrator.sock",
          "--node-id", "${node.unique.id}",
          "--net-agent-socket", "/run/sbx/net-agent.sock",
          "--dns-socket", "/run/sbx/dns.sock",
          "--metrics-port", "${NOMAD_PORT_metrics}",
        ]
      }

      # Lists go through the environment: the service splits SBX_ORCHESTRATOR_* lists on commas.
      # SBX_ENV_FILE: the launcher reads the rendered template at every start (a restart after
      # `nomad var put` too; `env = true` is read by Nomad once per allocation).
      env {
        SBX_ENV_FILE                          = "${NOMAD_SECRETS_DIR}/sbx.env"
        SBX_ORCHESTRATOR_UFFD_SERVER_SOCKETS  = join(",", var.uffd_sockets)
        SBX_ORCHESTRATOR_BLOCK_SERVER_SOCKETS = join(",", var.block_sockets)
      }

      # Node-wide settings from the Nomad variable nomad/jobs (bucket -> SBX_BUCKET, cache_dir ->
      # SBX_CACHE_DIR), then this job's own from nomad/jobs/sbx-orchestrator (redis_url ->
      # SBX_ORCHESTRATOR_REDIS_URL, firecracker_bin, kernel_path, ...). Both optional. noop: a
      # config change must not restart the orchestrator under running sandboxes; restart the task
      # to apply it.
      template {
        destination = "secrets/sbx.env"
        env         = false
        change_mode = "noop"
        data        = <<-EOT
          {{- if nomadVarExists "nomad/jobs" }}{{ with nomadVar "nomad/jobs" }}{{ range $k, $v := . }}
          SBX_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
          {{- if nomadVarExists "nomad/jobs/sbx-orchestrator" }}{{ with nomadVar "nomad/jobs/sbx-orchestrator" }}{{ range $k, $v := . }}
          SBX_ORCHESTRATOR_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
        EOT
      }

      # Leave Consul before SIGTERM so the control plane stops sending new sandboxes here first.
      shutdown_delay = "5s"
      kill_signal    = "SIGTERM"
      kill_timeout   = "30s"

      resources {
        cpu    = 1000
        memory = 1024
      }

      service {
        name = "sbx-orchestrator"
        port = "grpc"
        tags = ["sbx", "grpc"]
        meta {
          socket = "/run/sbx/orchestrator.sock"
        }

        # The upstream API is TCP, so Consul probes grpc.health.v1 natively on it.
        check {
          name     = "grpc-health"
          type     = "grpc"
          port     = "grpc"
          interval = "10s"
          timeout  = "5s"

          check_restart {
            limit = 3
            grace = "60s"
          }
        }
      }

      service {
        name = "sbx-orchestrator-metrics"
        port = "metrics"
        # The orchestrator binds its metrics on loopback only (it has no --metrics-host yet).
        address = "127.0.0.1"
        tags = ["sbx", "metrics"]
        meta {
          metrics_path = "/metrics"
          metrics_prefix = "sbx_orchestrator_"
        }

        check {
          name     = "metrics"
          type     = "http"
          port     = "metrics"
          path     = "/metrics"
          interval = "30s"
          timeout  = "5s"
        }
      }
    }
  }
}
