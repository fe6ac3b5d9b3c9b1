-- One server, three databases: Dagster's storage, MLflow's backend store, the warehouse.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
CREATE DATABASE warehouse;
