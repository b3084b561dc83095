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
# The run ledger's head when the round began ("<entries>:<head hash>"): a node records it in its
# own ledger, a witness of the run ledger outside the run directory (common.witness).
RUN_HEAD = "fedpriv-run-head"
# With adaptive clipping (user_dp.adaptive_clipping): the round's user-level clipping norm, which
# the server moves each round from the noisy count of unclipped updates.
USER_CLIP = "fedpriv-user-clip"

# Metric keys in a client's train reply. Nothing about local training that no accounting covers
# (loss, example or step counts, the update's norm) is sent: it stays in the node's own log.
CLIENT_ID = "client-id"

# Prefix of the metrics in a client's train reply describing what it spent (JSON strings), with
# record-level DP: "privacy.round-spend" and "privacy.prior-spends" (repeated in every reply).
PRIVACY = "privacy"
ROUND_SPEND = "round-spend"  # this round's DPSGDSpend
PRIOR_SPENDS = "prior-spends"  # spending before this run (from the node's own ledger)

# Every metric a client's train reply may carry (see docs/secure-aggregation.md, "What the server
# sees of each client").
REPLY_METRICS = (CLIENT_ID, f"{PRIVACY}.{ROUND_SPEND}", f"{PRIVACY}.{PRIOR_SPENDS}")

# The server's own key (not sent by clients): a client's cumulative record-level epsilon,
# computed from the spends recorded in the run's ledger.
RECORD_EPSILON = "record-epsilon"

# Error code of a client that refuses a round because its budget would be exceeded.
BUDGET_EXHAUSTED_CODE = 4001
# Error code of a client that refuses to mask its own malformed update (SecAgg+; clients.mods).
MALFORMED_UPDATE_CODE = 4002
# Error code of a client that refuses a SecAgg+ request because the server deviated from the
# protocol or asked for less than the node's floor (clients.secagg_guard).
SECAGG_REFUSED_CODE = 4003
# Error code of a node that refuses a run weaker than its own privacy policy (clients.policy).
POLICY_REFUSED_CODE = 4004
# Error code of a node that refuses an app bundle not signed by a key it trusts (clients.app_gate).
APP_REFUSED_CODE = 4005
# The codes of a node refusing on privacy grounds: the server records each in the run's ledger.
REFUSAL_CODES = (BUDGET_EXHAUSTED_CODE, SECAGG_REFUSED_CODE, POLICY_REFUSED_CODE, APP_REFUSED_CODE)
