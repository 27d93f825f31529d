# Sourced by every batch job on the simulated cluster. Jobs run on this
# machine's own Python environment (VIRGO_PYTHON), so nothing is loaded here.
# Gloo, torchrun's c10d store and Horovod find each other through the node
# names of the cluster (in /etc/hosts while the cluster runs), as on a real
# cluster through its DNS.
true
