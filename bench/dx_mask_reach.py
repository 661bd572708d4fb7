"""How much of the pipelined conv dx's work an output mask leaves, by row order.

The pipelined dx (cc/kernels/cuda/masked_conv2d_kernels.cuh) takes 128 input
pixels a thread block. Under an output mask a block walks the list entries of
the taps at which one of its pixels meets a live output pixel (none: it stores
zeros), and a warp multiplies a strip of 16 pixels at a tap only where one of
them meets a live output pixel there. This counts those fractions of the dense
work for random output tiles, with the block's pixels in raster order and tile
by tile over the input tiles the output tiles step over (the kernel's order
under an output mask), for a stride-1 SAME conv. A model of the kernel's
skipping, not a measurement: it runs on numpy alone.

    python3 bench/dx_mask_reach.py [--size 56] [--tile 8] [--filter 3] [--batch 8]
"""
import argparse

import numpy as np


def row_pixels(order, batch, size, tile):
    """The input pixels (n, y, x) in the dx's row order."""
    if order == "raster":
        n, y, x = np.meshgrid(np.arange(batch), np.arange(size), np.arange(size), indexing="ij")
        return n.ravel(), y.ravel(), x.ravel()
    tiles = size // tile
    n, ty, tx, qy, qx = np.meshgrid(np.arange(batch), np.arange(tiles), np.arange(tiles), np.arange(tile),
                                    np.arange(tile), indexing="ij")
    return n.ravel(), (ty * tile + qy).ravel(), (tx * tile + qx).ravel()


def fractions(live_output, order, tile, taps):
    """(row tiles walked, (row tile, tap) pairs walked, strips multiplied) as
    fractions of the dense work."""
    batch, size, _ = live_output.shape
    reach = taps // 2
    padded = np.zeros((batch, size + 2 * reach, size + 2 * reach), bool)
    padded[:, reach:reach + size, reach:reach + size] = live_output
    n, y, x = row_pixels(order, batch, size, tile)
    rows = len(n) // 128 * 128
    # Input pixel (y, x) meets output pixel (y + reach - ky, x + reach - kx) at tap (ky, kx).
    meets = np.stack([padded[n, y + 2 * reach - ky, x + 2 * reach - kx][:rows]
                      for ky in range(taps) for kx in range(taps)])
    per_tile_tap = meets.reshape(len(meets), -1, 128).any(2)
    strips = meets.reshape(len(meets), -1, 16).any(2)
    return per_tile_tap.any(0).mean(), per_tile_tap.mean(), strips.mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=56, help="the output's height and width (a multiple of --tile)")
    parser.add_argument("--tile", type=int, default=8, help="the output mask's tile size")
    parser.add_argument("--filter", type=int, default=3, help="the filter's height and width (odd)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.batch} x {args.size} x {args.size}, {args.tile} x {args.tile} tiles, "
          f"{args.filter} x {args.filter} SAME, stride 1: fractions of the dense dx work\n")
    print("| active tiles | order | row tiles walked | (row tile, tap) walked | strips multiplied |")
    print("|---:|---|---:|---:|---:|")
    for active in (0.1, 0.25, 0.5):
        tiles = rng.random((args.batch, args.size // args.tile, args.size // args.tile)) < active
        live = np.repeat(np.repeat(tiles, args.tile, 1), args.tile, 2)
        for order in ("raster", "tiles"):
            walked, pairs, strips = fractions(live, order, args.tile, args.filter)
            print(f"| {active:g} | {order} | {walked:.2f} | {pairs:.2f} | {strips:.2f} |")


if __name__ == "__main__":
    main()
