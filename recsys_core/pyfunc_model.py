"""The registered model as an MLflow pyfunc ("models from code").

MLflow logs this file with the model version's directory as the artifact ``model_dir``, so that
``mlflow.pyfunc.load_model("models:/recsys-two-tower@champion")`` works for anyone: ``predict`` takes a
DataFrame with ``user_id`` (and optionally ``k``) and returns the top-k track ids, already-heard tracks
excluded, popularity for unknown users. It ranks with the service's own scorer
(:class:`recsys_core.scoring.Ranker`), so both answer the same.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class TwoTowerRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from recsys_core.model_version import ModelArtifact
        from recsys_core.scoring import Ranker

        self.ranker = Ranker(ModelArtifact.load(context.artifacts["model_dir"]), version=0)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        k_default = int((params or {}).get("k", 10))
        rows = []
        for record in model_input.to_dict("records"):
            rec = self.ranker.recommend(str(record["user_id"]), int(record.get("k") or k_default))
            rows.append({"user_id": record["user_id"], "track_ids": rec.track_ids, "fallback": rec.fallback})
        return pd.DataFrame(rows)


mlflow.models.set_model(TwoTowerRecommender())
