# uffd-server: guest memory through userfaultfd, one or more instances on every sandbox node.
#
#   nomad job run -var-file=deploy/nomad/node.vars.hcl deploy/nomad/uffd-server.nomad.hcl
#
# One task group per entry of var.uffd_sockets, so each instance is its own allocation with its own
# control socket, metrics port, restarts and logs. The orchestrator job receives the same list and
# places each sandbox on the least loaded instance. A system job cannot have count > 1 per group;
# a group per instance is how Nomad runs several copies of a node agent on every node.

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

job "sbx-uffd-server" {
  type        = "system"
  datacenters = var.datacenters
  node_pool   = var.node_pool
  priority    = 80

  constraint {
    attribute = "${attr.kernel.name}"
    value     = "linux"
  }

  # Roll one node at a time: an instance restart stalls the page faults of its sandboxes.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  dynamic "group" {
    for_each = var.uffd_sockets
    labels   = ["uffd-server-${group.key}"]

    content {
      network {
        port "metrics" {}
      }

      # A node agent has nowhere else to go: keep restarting it in place, never give up.
      restart {
        attempts = 5
        interval = "5m"
        delay    = "5s"
        mode     = "delay"
      }

      task "uffd-server" {
        # raw_exec: runs as root in the host namespaces (userfaultfd, memfd, SCM_RIGHTS from
        # Firecracker on a socket in /run/sbx); see README.md "Driver".
        driver = "raw_exec"

        config {
          command = "${var.sbx_root}/sbx"
          args = [
            "uffd-server", "serve",
            "--control-socket", "${group.value}",
            "--metrics-host", "${NOMAD_IP_metrics}",
            "--metrics-port", "${NOMAD_PORT_metrics}",
          ]
        }

        # Node-wide settings from the Nomad variable nomad/jobs (bucket -> SBX_BUCKET, cache_dir ->
        # SBX_CACHE_DIR), then this job's own from nomad/jobs/sbx-uffd-server (log_level ->
        # SBX_UFFD_SERVER_LOG_LEVEL). Both optional. noop: a config change must not restart the
        # memory server under running sandboxes; restart the task to apply it.
        template {
          destination = "secrets/sbx.env"
          env         = false
          change_mode = "noop"
          data        = <<-EOT
            {{- if nomadVarExists "nomad/jobs" }}{{ with nomadVar "nomad/jobs" }}{{ range $k, $v := . }}
            SBX_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
            {{- if nomadVarExists "nomad/jobs/sbx-uffd-server" }}{{ with nomadVar "nomad/jobs/sbx-uffd-server" }}{{ range $k, $v := . }}
            SBX_UFFD_SERVER_{{ $k | toUpper }}={{ $v.Value | toJSON }}{{ end }}{{ end }}{{ end }}
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
          cpu    = 1000
          memory = 1024
        }

        service {
          name = "sbx-uffd-server"
          port = "metrics"
          tags = ["sbx", "metrics", "instance-${group.key}"]
          meta {
            socket       = "${group.value}"
            metrics_path = "/metrics"
            metrics_prefix = "sbx_uffd_server_"
          }

          # grpc.health.v1 on the control socket itself: Consul's grpc check needs TCP, and this
          # probes exactly the socket the orchestrator uses.
          check {
            name     = "grpc-health"
            type     = "script"
            command  = "${var.sbx_root}/sbx"
            args     = ["health", "${group.value}"]
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
}
