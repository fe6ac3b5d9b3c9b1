"""Assets by stage: ingestion → preparation → features → training → evaluation → registry → deployment → monitoring."""
