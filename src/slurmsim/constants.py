"""Constants of the Slurm simulator: the state file's name, the tag variable, the Debian packages and the
commands they provide, the partition, and the port ranges of the daemons."""

STATE_FILE = "slurmsim-state.json"
TAG_ENV = "VIRGO_SLURMSIM_TAG"
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
ACCOUNTING_COMMANDS = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb")
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
MUNGE_COMMANDS = ("munged", "munge", "unmunge")
NETNS_COMMANDS = ("ip", "nsenter", "unshare", "hostname")
PARTITION = "debug"
# Job states after which a job runs no more (a requeued job leaves them again).
FINAL_JOB_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)

# The daemons' ports lie below 20000: a job's rendezvous port is 20000 + its id % 10000
# (virgo_exps.launch.protocol), and a daemon listening there would refuse that job later.
DAEMON_PORTS = 16000  # slurmctld/slurmd pairs: 16000-19999
ACCOUNTING_PORTS = 12000  # MariaDB/slurmdbd pairs: 12000-15999
