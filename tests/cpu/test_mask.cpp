// core/mask.h, the one definition of the mask and the score modifier: its int and int64 forms
// agree, its block classification matches the per-element rule, the offset test is the same
// visibility, and ScoreMod's derivative is the derivative of its value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "core/mask.h"

namespace {

using flashattn::BlockVisibility;
using flashattn::Mask;
using flashattn::Mask32;
using flashattn::ScoreMod;

struct Shape {
  int64_t sq, sk, left, right;
};
constexpr Shape kShapes[] = {{7, 7, -1, -1}, {7, 13, -1, 0},   {13, 7, -1, 0},  {9, 20, 3, 2},
                             {20, 9, 0, 0},  {5, 5, 100, 100}, {1, 64, 16, -1}, {64, 1, -1, 5}};

TEST(Mask, IntAndInt64FormsAgree) {
  for (const Shape& s : kShapes) {
    const Mask m = Mask::make(s.sq, s.sk, s.left, s.right);
    const Mask32 m32 = Mask32::make(s.sq, s.sk, s.left, s.right);
    for (int64_t i = 0; i < s.sq; ++i) {
      EXPECT_EQ(m.key_begin(i), m32.key_begin(int(i)));
      EXPECT_EQ(m.key_end(i), m32.key_end(int(i)));
      for (int64_t j = 0; j < s.sk; ++j) {
        EXPECT_EQ(m.visible(i, j), m32.visible(int(i), int(j)));
        EXPECT_EQ(m.distance(i, j), m32.distance(int(i), int(j)));
        // the offset form of the same visibility
        const bool by_offset = j - i >= m32.lowest_offset() && j - i <= m32.highest_offset();
        EXPECT_EQ(m.visible(i, j), by_offset) << "i " << i << " j " << j;
      }
    }
  }
}

TEST(Mask, CausalIsBottomRightAligned) {
  const Mask m = Mask::make(3, 5, -1, 0);  // query i sees keys j <= i + 2
  EXPECT_EQ(m.key_end(0), 3);
  EXPECT_EQ(m.key_end(2), 5);
  const Mask wide = Mask::make(5, 3, -1, 0);  // the first two queries see nothing
  EXPECT_EQ(wide.key_end(0), 0);
  EXPECT_EQ(wide.key_end(1), 0);
  EXPECT_EQ(wide.key_end(2), 1);
}

TEST(Mask, BlockClassificationMatchesElements) {
  for (const Shape& s : kShapes) {
    const Mask m = Mask::make(s.sq, s.sk, s.left, s.right);
    for (int64_t r0 = 0; r0 < s.sq; r0 += 3)
      for (int64_t c0 = 0; c0 < s.sk; c0 += 4) {
        const int64_t r1 = std::min(r0 + 3, s.sq), c1 = std::min(c0 + 4, s.sk);
        int seen = 0, all = 0;
        for (int64_t i = r0; i < r1; ++i)
          for (int64_t j = c0; j < c1; ++j, ++all) seen += m.visible(i, j);
        const BlockVisibility v = m.classify(r0, r1, c0, c1);
        // kPartial may also hold a block that happens to be all or nothing (rows' ranges straddle it):
        // the kernels then only mask more than they need to.
        EXPECT_EQ(v == BlockVisibility::kFull, seen == all) << r0 << "," << c0;
        EXPECT_EQ(v == BlockVisibility::kEmpty, seen == 0) << r0 << "," << c0;
      }
  }
}

TEST(ScoreMod, ValueAndDerivative) {
  const ScoreMod mod = ScoreMod::make(5.0f, 0.25f);
  for (double x : {-30.0, -3.0, -0.1, 0.0, 0.7, 4.0, 40.0}) {
    const double d = 3.0;
    double dscore = 0;
    const double y = mod.apply(x, d, dscore);
    EXPECT_NEAR(y, 5.0 * std::tanh(x / 5.0) - 0.25 * d, 1e-12);
    const double h = 1e-6;
    const double numeric = (mod.apply(x + h, d) - mod.apply(x - h, d)) / (2 * h);
    EXPECT_NEAR(dscore, numeric, 1e-6) << "x " << x;
  }
  const ScoreMod off = ScoreMod::make(0.0f, 0.0f);
  EXPECT_FALSE(off.active());
  float dscore = 0;
  EXPECT_EQ(off.apply(1.5f, 2.0f, dscore), 1.5f);
  EXPECT_EQ(dscore, 1.0f);
}

}  // namespace
