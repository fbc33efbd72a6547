// src/rearrange.cpp: rearrange (include/torchfunc/rearrange.h). The pattern
// becomes three steps on the logical shape: reshape into the left side's
// axes, permute them into the right side's order, reshape into the right
// side's dimensions.
#include <torchfunc/rearrange.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

namespace torchfunc {
namespace {

constexpr const char* kEllipsis = "...";

/// One dimension of a side: its axes (outer to inner); none for a unit
/// dimension (`1` or `()`).
struct Group {
  std::vector<std::string> axes;
  bool composed = false;  // written in parentheses
};

struct Parser {
  const std::string& pattern;
  [[noreturn]] void fail(const std::string& problem) const {
    TORCH_CHECK(false, "torchfunc::rearrange(\"", pattern, "\"): ", problem);
  }

  static bool is_identifier(const std::string& s) {
    if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
    return std::all_of(s.begin(), s.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
  }

  std::vector<Group> side(const std::string& text, const char* which) const {
    std::vector<Group> groups;
    bool open = false;
    size_t i = 0;
    auto atom = [&](std::string a) {
      if (a == "1") {
        if (open) fail(std::string("'1' inside parentheses on the ") + which + " side; write the group without it");
        groups.push_back(Group{});
        return;
      }
      if (a != kEllipsis && !is_identifier(a))
        fail("'" + a + "' on the " + which + " side is not an axis name (letters, digits and _, not starting with a "
             "digit), '1', '...' or a parenthesis");
      if (open) {
        groups.back().axes.push_back(std::move(a));
      } else {
        Group g;
        g.axes.push_back(std::move(a));
        groups.push_back(std::move(g));
      }
    };
    while (i < text.size()) {
      const char c = text[i];
      if (std::isspace(static_cast<unsigned char>(c))) {
        ++i;
      } else if (c == '(') {
        if (open) fail(std::string("nested parentheses on the ") + which + " side");
        open = true;
        Group g;
        g.composed = true;
        groups.push_back(std::move(g));
        ++i;
      } else if (c == ')') {
        if (!open) fail(std::string("')' without '(' on the ") + which + " side");
        open = false;
        ++i;
      } else {
        size_t j = i;
        if (text.compare(i, 3, kEllipsis) == 0) {
          j = i + 3;
        } else {
          while (j < text.size() && !std::isspace(static_cast<unsigned char>(text[j])) && text[j] != '(' &&
                 text[j] != ')')
            ++j;
        }
        atom(text.substr(i, j - i));
        i = j;
      }
    }
    if (open) fail(std::string("'(' without ')' on the ") + which + " side");
    // Each name once; '...' once.
    std::set<std::string> seen;
    for (const auto& g : groups)
      for (const auto& a : g.axes)
        if (!seen.insert(a).second)
          fail(a == kEllipsis ? std::string("'...' appears twice on the ") + which + " side"
                              : "axis '" + a + "' appears twice on the " + which + " side");
    return groups;
  }
};

}  // namespace

at::Tensor rearrange(const at::Tensor& t, const std::string& pattern,
                     const std::vector<std::pair<std::string, int64_t>>& axes_lengths) {
  Parser p{pattern};
  TORCH_CHECK(t.defined(), "torchfunc::rearrange(\"", pattern, "\"): the tensor is undefined.");
  const auto arrow = pattern.find("->");
  if (arrow == std::string::npos || pattern.find("->", arrow + 2) != std::string::npos)
    p.fail("expected exactly one '->' between the two sides");
  std::vector<Group> left = p.side(pattern.substr(0, arrow), "left");
  std::vector<Group> right = p.side(pattern.substr(arrow + 2), "right");

  // '...' on the left stands for as many dimensions as t has beyond the rest.
  int64_t ellipsis_dims = 0;
  const auto has_ellipsis = [](const std::vector<Group>& side) {
    for (const auto& g : side)
      if (std::find(g.axes.begin(), g.axes.end(), kEllipsis) != g.axes.end()) return true;
    return false;
  };
  const bool left_ellipsis = has_ellipsis(left), right_ellipsis = has_ellipsis(right);
  if (left_ellipsis != right_ellipsis)
    p.fail(std::string("'...' on the ") + (left_ellipsis ? "left" : "right") + " side only; use it on both or neither");
  for (const auto& g : left)
    if (g.composed && std::find(g.axes.begin(), g.axes.end(), kEllipsis) != g.axes.end())
      p.fail("'...' inside parentheses on the left side");
  const int64_t fixed = static_cast<int64_t>(left.size()) - (left_ellipsis ? 1 : 0);
  if (left_ellipsis) {
    if (t.dim() < fixed)
      p.fail("the left side names at least " + std::to_string(fixed) + " dimensions, but the tensor has " +
             std::to_string(t.dim()));
    ellipsis_dims = t.dim() - fixed;
  } else if (t.dim() != fixed) {
    p.fail("the left side names " + std::to_string(fixed) + " dimensions, but the tensor has " +
           std::to_string(t.dim()) + " (shape " + c10::str(t.sizes()) + ")");
  }
  auto expand = [&](std::vector<std::string>& axes) {  // '...' -> its dimensions, in place
    auto at = std::find(axes.begin(), axes.end(), kEllipsis);
    if (at == axes.end()) return;
    std::vector<std::string> dims;
    for (int64_t k = 0; k < ellipsis_dims; ++k) dims.push_back("..." + std::to_string(k));
    at = axes.erase(at);
    axes.insert(at, dims.begin(), dims.end());
  };

  // Sizes: given ones, then each left dimension's (one unknown per dimension).
  std::map<std::string, int64_t> size;
  for (const auto& [name, n] : axes_lengths) {
    if (!Parser::is_identifier(name)) p.fail("axes_lengths names '" + name + "', which is not an axis name");
    if (n <= 0) p.fail("axes_lengths gives '" + name + "' the size " + std::to_string(n) + "; sizes must be positive");
    if (!size.emplace(name, n).second) p.fail("axes_lengths gives '" + name + "' twice");
  }
  std::vector<std::string> left_axes;  // every left axis, outer to inner
  std::vector<int64_t> left_sizes;
  int64_t dim = 0;
  for (auto& g : left) {
    if (g.axes.size() == 1 && g.axes[0] == kEllipsis) {
      for (int64_t k = 0; k < ellipsis_dims; ++k, ++dim) {
        left_axes.push_back("..." + std::to_string(k));
        left_sizes.push_back(t.size(dim));
        size["..." + std::to_string(k)] = t.size(dim);
      }
      continue;
    }
    const int64_t d = t.size(dim++);
    if (g.axes.empty()) {
      if (d != 1) p.fail("'1' on the left side stands for a dimension of size 1, but dimension " +
                         std::to_string(dim - 1) + " has size " + std::to_string(d));
      continue;
    }
    if (!g.composed) {  // one axis: its size is the dimension's
      const std::string& a = g.axes[0];
      auto it = size.find(a);
      if (it != size.end() && it->second != d)
        p.fail("axis '" + a + "' has size " + std::to_string(d) + " in the tensor but " +
               std::to_string(it->second) + " in axes_lengths");
      size[a] = d;
    } else {
      int64_t known = 1;
      std::string unknown;
      for (const auto& a : g.axes) {
        auto it = size.find(a);
        if (it != size.end()) {
          known *= it->second;
        } else if (unknown.empty()) {
          unknown = a;
        } else {
          p.fail("the dimension (" + c10::Join(" ", g.axes) + ") has more than one axis of unknown size ('" +
                 unknown + "' and '" + a + "'); give all but one in axes_lengths");
        }
      }
      if (unknown.empty() ? known != d : d % known != 0)
        p.fail("the dimension (" + c10::Join(" ", g.axes) + ") has size " + std::to_string(d) + ", which is not " +
               (unknown.empty() ? "" : "a multiple of ") + "the product of its given sizes, " + std::to_string(known));
      if (!unknown.empty()) size[unknown] = d / known;
    }
    for (const auto& a : g.axes) {
      left_axes.push_back(a);
      left_sizes.push_back(size.at(a));
    }
  }

  // The right side: the same axes, each once.
  std::vector<std::string> right_axes;
  std::vector<int64_t> right_shape;
  for (auto& g : right) {
    if (!g.composed && g.axes.size() == 1 && g.axes[0] == kEllipsis) {  // '...' alone: its dimensions as they are
      for (int64_t k = 0; k < ellipsis_dims; ++k) {
        right_axes.push_back("..." + std::to_string(k));
        right_shape.push_back(size.at(right_axes.back()));
      }
      continue;
    }
    expand(g.axes);
    int64_t n = 1;
    for (const auto& a : g.axes) {
      if (std::find(left_axes.begin(), left_axes.end(), a) == left_axes.end())
        p.fail("axis '" + a + "' is on the right side but not on the left (rearrange cannot make new axes; "
               "only '1')");
      right_axes.push_back(a);
      n *= size.at(a);
    }
    right_shape.push_back(n);
  }
  for (const auto& a : left_axes)
    if (std::find(right_axes.begin(), right_axes.end(), a) == right_axes.end())
      p.fail(a.rfind("...", 0) == 0 ? std::string("'...' is on the left side but not on the right")
                                    : "axis '" + a + "' is on the left side but not on the right (rearrange keeps "
                                      "every element; reduce it first)");
  for (const auto& [name, n] : axes_lengths)
    if (std::find(left_axes.begin(), left_axes.end(), name) == left_axes.end())
      p.fail("axes_lengths gives '" + name + "', which the pattern does not use");

  std::vector<int64_t> perm;
  for (const auto& a : right_axes)
    perm.push_back(std::find(left_axes.begin(), left_axes.end(), a) - left_axes.begin());
  return t.reshape(left_sizes).permute(perm).reshape(right_shape);
}

}  // namespace torchfunc
