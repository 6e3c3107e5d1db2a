"""Vocabulary, CLIP image embeddings, kNN (FAISS) and candidate sets."""
