"""The registered model as an MLflow pyfunc ("models from code").

MLflow logs this file with the model version's directory as the artifact ``model_dir``, so that
``mlflow.pyfunc.load_model("models:/recsys-two-tower@champion")`` works for anyone: ``predict`` takes a
DataFrame with ``user_id`` (and optionally ``k``) and returns the top-k track ids, already-heard tracks
excluded, popularity for unknown users. The BentoML service reads the same directory directly.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class TwoTowerRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from recsys_assets.ml.artifacts import ModelArtifact

        self.artifact = ModelArtifact.load(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        a = self.artifact
        k_default = int((params or {}).get("k", 10))
        rows = []
        for record in model_input.to_dict("records"):
            k = int(record.get("k") or k_default)
            row = a.user_row(str(record["user_id"]))
            if row == 0:
                top = a.popular_rows[:k]
                fallback = True
            else:
                scores = a.item_embeddings @ a.user_embeddings[row]
                scores[0] = -np.inf
                scores[a.seen(row)] = -np.inf
                top = np.argsort(-scores, kind="stable")[:k]
                fallback = False
            rows.append(
                {"user_id": record["user_id"], "track_ids": [str(a.item_ids[i]) for i in top], "fallback": fallback}
            )
        return pd.DataFrame(rows)


mlflow.models.set_model(TwoTowerRecommender())
