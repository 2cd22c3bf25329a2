#pragma once
// Line plots as PNG files, with nothing but zlib: an RGB canvas, lines, a 5x7 bitmap font, and a
// PNG writer. Enough for training curves (accuracy against updates, one line per run).
//
//   PlotOptions o;
//   o.title = "delayed memory", o.x_label = "update", o.y_label = "accuracy", o.y_min = 0, o.y_max = 1;
//   plot_lines("run/accuracy.png", {{"mamba H=16", xs, ys}, {"gru H=16", xs, ys2, /*dashed=*/true}}, o);
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace statemamba::rl {

struct Rgb {
  uint8_t r, g, b;
};

class Image {
 public:
  Image(int width, int height, Rgb background = {255, 255, 255});
  int width() const { return width_; }
  int height() const { return height_; }
  Rgb at(int x, int y) const;
  void set(int x, int y, Rgb c);  // ignores pixels outside the image
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c);  // inclusive corners
  // A line `thickness` pixels wide; dashed: 8 pixels drawn, 5 skipped.
  void line(double x0, double y0, double x1, double y1, Rgb c, int thickness = 1, bool dashed = false);
  // ASCII text in the 5x7 font, each font pixel drawn scale x scale; (x, y) is the top left.
  void text(int x, int y, const std::string& s, Rgb c, int scale = 1);
  static int text_width(const std::string& s, int scale = 1) { return static_cast<int>(s.size()) * 6 * scale; }
  static int text_height(int scale = 1) { return 7 * scale; }
  // An 8-bit RGB PNG; c10::Error naming the file when it cannot be written.
  void write_png(const std::string& path) const;

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;
  long dash_ = 0;  // position in the dash pattern, carried along a polyline
};

struct Series {
  std::string label;
  std::vector<double> x, y;  // NaN y values leave a gap
  bool dashed = false;
  int color = -1;  // index into the palette (matplotlib's tab10); -1: the series' position
};

struct PlotOptions {
  std::string title, x_label, y_label;
  int width = 1000, height = 600;
  std::optional<double> y_min, y_max;  // else from the data
};

// Axes with gridlines and tick labels, one coloured polyline per series, and a legend.
void plot_lines(const std::string& path, const std::vector<Series>& series, const PlotOptions& options);

}  // namespace statemamba::rl
