"""Pictures: the frames of a run, its loss curve, image grids.

Frames are drawn with one reused figure (creating a figure per frame costs more than
drawing it), at fixed axes so the PNGs line up as an animation; frames of points are
drawn onto a copy of the axes rendered once.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402  (matplotlib's own dependency)

LIMIT = 6  # 2D frames show [-6, 6]^2, like the classic


def image_grid(images, ncols=None):
    """[n, H, W] or [n, C, H, W] (C = 1 grey, 3 colour) in [-1, 1] -> one [rows*H, cols*W] array (colour:
    [rows*H, cols*W, 3]) in [0, 1], 1-pixel white gaps."""
    images = np.clip((np.asarray(images) + 1) / 2, 0, 1)
    if images.ndim == 4:  # channels last for imshow; one channel: plain grey
        images = images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)
    n, h, w = images.shape[:3]
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1, *images.shape[3:]), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image
    return grid


class FrameDrawer:
    """Draws frames into PNGs with one reused figure: a scatter for points, a grid for images."""

    def __init__(self, is_image=False, limits=((-LIMIT, LIMIT), (-LIMIT, LIMIT)), max_images=100):
        """limits: the axes of frames of points, ((x_lo, x_hi), (y_lo, y_hi)); a point file's are in its units."""
        self.is_image, self.max_images = is_image, max_images
        self.fig, self.ax = plt.subplots(figsize=(5, 5), dpi=80)
        if is_image:
            self.artist = self.ax.imshow(np.zeros((2, 2)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            self.ax.axis("off")
        else:
            self.artist = self.ax.scatter([], [], s=4, alpha=0.6, linewidths=0)
            self.ax.set_xlim(*limits[0])
            self.ax.set_ylim(*limits[1])
            self.ax.set_aspect("equal")
        self.title = self.ax.set_title("epoch 0")  # tight_layout leaves room for a title
        self.fig.tight_layout()
        self.title.set_text("")
        if not is_image:  # the axes, ticks and labels without points or title: the same in every frame
            self.fig.canvas.draw()
            self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

    def draw(self, frame, path, title=""):
        self.title.set_text(title)
        if self.is_image:
            grid = image_grid(frame[:self.max_images] if frame.ndim == 4 else frame[:self.max_images].reshape(
                -1, *frame.shape[-2:]))
            self.artist.set_data(grid)
            self.artist.set_extent((0, grid.shape[1], grid.shape[0], 0))
            self.ax.set_xlim(0, grid.shape[1])
            self.ax.set_ylim(grid.shape[0], 0)
            self.fig.savefig(path, pil_kwargs={"compress_level": 1})  # fast PNG compression: quicker, larger files
            return
        # Points: laying out the tick labels was most of a full savefig. Paste the background
        # rendered once and draw only the points and the title on it (docs/speed.md).
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.artist.set_offsets(frame)
        self.ax.draw_artist(self.artist)
        self.ax.draw_artist(self.title)
        PIL.Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).save(path, compress_level=1)

    def close(self):
        plt.close(self.fig)


def draw_frames(frames, folder, is_image=False, epochs=None):
    """One PNG per frame: folder/0000.png, 0001.png, ..."""
    os.makedirs(folder, exist_ok=True)
    drawer = FrameDrawer(is_image)
    for i, frame in enumerate(frames):
        drawer.draw(frame, os.path.join(folder, f"{i:04d}.png"),
                    f"epoch {epochs[i]}" if epochs is not None else f"frame {i}")
    drawer.close()


def draw_loss(losses, path):
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.3, label="per step")
    if len(losses) >= 50:
        window = max(len(losses) // 100, 10)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples_png(samples, path, title="", limits=((-LIMIT, LIMIT), (-LIMIT, LIMIT))):
    """A PNG of samples: a scatter for points [n, 2] within `limits`, a grid for images [n, (C,) H, W]."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=80)
        ax.scatter(samples[:, 0], samples[:, 1], s=4, alpha=0.6, linewidths=0)
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_aspect("equal")
    else:
        grid = image_grid(samples)
        fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40), dpi=80)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
