"""Names of the records and keys exchanged between the fedpriv ServerApp and ClientApp."""

# RecordDict keys (Flower's strategies use the same defaults).
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# Metric keys in a client's train reply.
NUM_EXAMPLES = "num-examples"  # weighting key for FedAvg
TRAIN_LOSS = "train-loss"
RECORD_EPSILON = "record-epsilon"  # cumulative over every round the client trained in
CLIENT_ID = "client-id"
STEPS = "steps"
