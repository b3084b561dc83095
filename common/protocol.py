"""Names of the keys exchanged between the fedpriv ServerApp and ClientApp.

Messages use Flower's legacy FitIns / FitRes layout (SecAgg+ needs it); these are the keys inside
its config and metrics.
"""

# Keys of the server's fit config.
SERVER_ROUND = "server-round"
CLIENTS_SAMPLED = "clients-sampled"  # clients in this round's sample (sizes distributed noise)
# fedpriv's id of the run, the same after a resume (Flower's run id changes with each server
# process): a node tags each spend it records with it and declares as prior spending only
# spends tagged otherwise.
RUN_ID = "fedpriv-run-id"

# Metric keys in a client's train reply.
NUM_EXAMPLES = "num-examples"  # weighting key for FedAvg
TRAIN_LOSS = "train-loss"
RECORD_EPSILON = "record-epsilon"  # cumulative over every round the client trained in
CLIENT_ID = "client-id"
STEPS = "steps"
UPDATE_NORM = "update-norm"  # L2 norm of the update before user-level clipping

# Prefix of the metrics in a client's train reply describing what it spent (JSON strings):
# "privacy.round-spend" and, on a node's first round of a run, "privacy.prior-spends".
PRIVACY = "privacy"
ROUND_SPEND = "round-spend"  # this round's DPSGDSpend
PRIOR_SPENDS = "prior-spends"  # spending before this run (from the node's own ledger)

# Error code of a client that refuses a round because its budget would be exceeded.
BUDGET_EXHAUSTED_CODE = 4001
# Error code of a client that refuses to mask its own malformed update (SecAgg+; clients.mods).
MALFORMED_UPDATE_CODE = 4002
