# One node layout for every sbx job: pass it to each `nomad job run` with -var-file.
# Every job declares all of these (Nomad rejects a var-file that sets an undeclared variable).

sbx_root     = "/opt/sbx"
datacenters  = ["*"]
node_pool    = "default"
uffd_sockets = ["/run/sbx/uffd-server-0.sock", "/run/sbx/uffd-server-1.sock"]
block_sockets = ["/run/sbx/block-server-0.sock", "/run/sbx/block-server-1.sock"]
