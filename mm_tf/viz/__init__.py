"""Seeing what M&M does: TensorBoard projector embeddings of patch features
(`projector`) and the report's figures (`figures`: t-SNE, graph-size study, qualitative
grid, Grad-CAM)."""
