"""Making and measuring edits: the algorithm side of NKV (no runtime lives here).

  solve/      facts in, keys and residuals out: `nkv.editing.solve.build_adapter`
  evaluate/   an adapter measured pre and post edit: `nkv.editing.evaluate.evaluate`

Both run a transformers model through `nkv.loaders` (architecture table, attach) and
write or read the format through `nkv`; nothing in `nkv.loaders` or `nkv` imports this
package. Importing it imports neither subpackage.
"""
