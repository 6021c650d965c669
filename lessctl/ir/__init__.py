"""The reranking extension (LESS.md section 7): BEIR collections as listwise reranking instructions, BM25 first stage.

Their evaluation (NDCG@5, MRR@5) is lessctl.evaluation.ranking's.
"""
