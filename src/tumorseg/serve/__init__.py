"""`tumorseg serve`: a local web app to segment a patient and look at the result
(FastAPI on uvicorn, the niivue viewer vendored under static/)."""
