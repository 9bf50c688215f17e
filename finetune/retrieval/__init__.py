"""Retrieval: embedders (one per backend), the FAISS index, search, and the HTTP service in serve/."""
