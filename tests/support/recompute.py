"""The runtime's oracle: greedy decoding by full recomputation with model(tokens, images) at every
step (no cache, no batching, no graphs)."""
import torch


def greedy_by_recompute(model, tokens: list[int], images, max_new_tokens: int, stop_ids=(2,)) -> list[int]:
    tokens, out = list(tokens), []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor(tokens), images)[-1].argmax())
        out.append(nxt)
        tokens.append(nxt)
        if nxt in stop_ids:
            break
    return out
